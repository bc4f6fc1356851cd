//! BPE training: count pre-split chunks in parallel, then learn merges incrementally.
//!
//! Phase A ([`ChunkCounter`]) splits each text with the pattern and counts every distinct chunk;
//! texts arrive in batches and are spread over the rayon pool, each worker counting into its own
//! map that lives for the whole stream (no per-batch reduction).
//!
//! Phase B ([`learn_merges`]) turns the distinct chunks into words of byte ids and repeatedly
//! merges the most frequent adjacent pair. Instead of recounting everything per merge it keeps
//! global pair counts, the list of words each pair occurs in, and a max-heap of candidate pairs
//! whose stored counts are refreshed lazily when popped. Ties on count go to the smaller pair
//! `(a, b)` (compared as unsigned ints, `a` first), which makes training deterministic.

use std::sync::Mutex;

use dary_heap::QuaternaryHeap;
use hashbrown::HashMap;
use rayon::prelude::*;
use rustc_hash::FxBuildHasher;

use crate::pretokenize::Splitter;

/// A pair of adjacent token ids.
pub type Pair = (u32, u32);

type FxMap<K, V> = HashMap<K, V, FxBuildHasher>;
/// Pair counts, and for each pair the words it occurs in.
type PairStats = (FxMap<u64, i64>, FxMap<u64, Vec<u32>>);

/// Pairs are hashed as one u64; its numeric order is the (a, b) lexicographic order.
#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

#[inline(always)]
fn unkey(k: u64) -> Pair {
    ((k >> 32) as u32, k as u32)
}

// -----------------------------------------------------------------------------
// Phase A: chunk counting

/// Chunks of at most this many bytes (nearly all of them) are counted under a packed u128 key.
const SHORT_CHUNK: usize = 15;

/// Counts of distinct chunks. A short chunk's key is its bytes and length packed into a u128: no
/// allocation, no pointer to follow and one integer compare per lookup, where a string key costs
/// a cache miss on its heap bytes and a memcmp (together the larger part of counting time).
#[derive(Default)]
struct ChunkMap {
    short: FxMap<u128, i64>,
    long: FxMap<Box<[u8]>, i64>,
}

impl ChunkMap {
    /// Count the chunk `text[start..start + len]`.
    #[inline(always)]
    fn add(&mut self, text: &[u8], start: usize, len: usize) {
        if len <= SHORT_CHUNK {
            *self.short.entry(pack_short(text, start, len)).or_insert(0) += 1;
        } else {
            let chunk = &text[start..start + len];
            match self.long.get_mut(chunk) {
                Some(c) => *c += 1,
                // Misses are rare once the common chunks are in; hashing twice on a miss is cheaper
                // than allocating a key for every lookup.
                None => {
                    self.long.insert(chunk.into(), 1);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    fn absorb(&mut self, other: ChunkMap) {
        for (k, c) in other.short {
            *self.short.entry(k).or_insert(0) += c;
        }
        for (k, c) in other.long {
            *self.long.entry(k).or_insert(0) += c;
        }
    }
}

/// Pack `text[start..start + len]` (len <= 15) with its length in the top byte.
#[inline(always)]
fn pack_short(text: &[u8], start: usize, len: usize) -> u128 {
    let word = match text.get(start..start + 16) {
        // One unaligned 16-byte load when the text extends that far; the mask drops the excess.
        Some(window) => u128::from_le_bytes(window.try_into().expect("16 bytes")),
        None => {
            let mut buf = [0u8; 16];
            buf[..len].copy_from_slice(&text[start..start + len]);
            u128::from_le_bytes(buf)
        }
    };
    let mask = (1u128 << (8 * len)) - 1;
    (word & mask) | ((len as u128) << 120)
}

fn unpack_short(key: u128) -> ([u8; 16], usize) {
    (key.to_le_bytes(), (key >> 120) as usize)
}

/// Counts the distinct chunks of a stream of texts.
pub struct ChunkCounter {
    splitter: Splitter,
    /// One map per rayon worker; a worker only ever locks its own, so the locks are uncontended.
    maps: Vec<Mutex<ChunkMap>>,
    texts_seen: u64,
}

impl ChunkCounter {
    /// A counter that splits with `splitter`, sized for the current rayon pool.
    pub fn new(splitter: Splitter) -> Self {
        let workers = rayon::current_num_threads().max(1);
        ChunkCounter {
            splitter,
            maps: (0..workers).map(|_| Mutex::default()).collect(),
            texts_seen: 0,
        }
    }

    /// Count the chunks of a batch of texts, in parallel.
    pub fn add_texts<S: AsRef<str> + Sync>(&mut self, texts: &[S]) {
        self.texts_seen += texts.len() as u64;
        let splitter = &self.splitter;
        let maps = &self.maps;
        texts.par_iter().with_min_len(4).for_each(|text| {
            let worker = rayon::current_thread_index().unwrap_or(0) % maps.len();
            let mut map = maps[worker].lock().unwrap_or_else(|e| e.into_inner());
            let text = text.as_ref();
            let base = text.as_ptr() as usize;
            splitter.for_each_chunk(text, |chunk| {
                // Chunks are subslices of `text`; their offset lets short keys load past the chunk.
                map.add(text.as_bytes(), chunk.as_ptr() as usize - base, chunk.len());
            });
        });
    }

    /// Number of texts counted so far.
    pub fn texts_seen(&self) -> u64 {
        self.texts_seen
    }

    fn merged(self) -> ChunkMap {
        let mut maps: Vec<ChunkMap> = self
            .maps
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
        // Fold the smaller maps into the largest one.
        maps.sort_by_key(|m| std::cmp::Reverse(m.len()));
        let mut it = maps.into_iter();
        let mut total = it.next().unwrap_or_default();
        for m in it {
            total.absorb(m);
        }
        total
    }

    /// The distinct chunks (as bytes) with their counts, in no particular order.
    pub fn into_counts(self) -> Vec<(Vec<u8>, i64)> {
        let map = self.merged();
        let short = map.short.into_iter().map(|(k, c)| {
            let (bytes, len) = unpack_short(k);
            (bytes[..len].to_vec(), c)
        });
        short
            .chain(map.long.into_iter().map(|(k, c)| (k.into_vec(), c)))
            .collect()
    }

    /// The distinct chunks as words of byte ids, ready for [`learn_merges`].
    pub fn into_words(self) -> Words {
        let map = self.merged();
        let mut words = Words::with_capacity(map.len(), map.short.len() * 8);
        for (k, c) in map.short {
            let (bytes, len) = unpack_short(k);
            words.push(&bytes[..len], c);
        }
        for (k, c) in map.long {
            words.push(&k, c);
        }
        words
    }
}

// -----------------------------------------------------------------------------
// Phase B: merges

/// All distinct words as byte-id sequences stored back to back, each shrinking in place as merges apply.
pub struct Words {
    ids: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

impl Words {
    /// Words from `(bytes, count)` items.
    pub fn new<B: AsRef<[u8]>>(items: &[(B, i64)]) -> Self {
        let total: usize = items.iter().map(|(b, _)| b.as_ref().len()).sum();
        let mut words = Words::with_capacity(items.len(), total);
        for (bytes, c) in items {
            words.push(bytes.as_ref(), *c);
        }
        words
    }

    fn with_capacity(words: usize, ids: usize) -> Self {
        Words {
            ids: Vec::with_capacity(ids),
            start: Vec::with_capacity(words),
            len: Vec::with_capacity(words),
            count: Vec::with_capacity(words),
        }
    }

    /// Append a word with `count` occurrences.
    pub fn push(&mut self, bytes: &[u8], count: i64) {
        self.start.push(self.ids.len());
        self.len.push(bytes.len() as u32);
        self.count.push(count);
        self.ids.extend(bytes.iter().map(|&b| b as u32));
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.count.len()
    }

    /// True when there are no words.
    pub fn is_empty(&self) -> bool {
        self.count.is_empty()
    }

    /// The current ids of word `w`.
    pub fn word(&self, w: usize) -> &[u32] {
        &self.ids[self.start[w]..self.start[w] + self.len[w] as usize]
    }
}

/// Pair counts weighted by word counts, and for each pair the (sorted, distinct) words it occurs in.
/// Words with fewer than two ids or a non-positive count contribute nothing.
pub fn count_pairs(words: &Words) -> PairStats {
    const BLOCK: usize = 1 << 14;
    let n = words.len();
    let blocks: Vec<PairStats> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|blk| {
            let mut counts = FxMap::default();
            let mut where_ = FxMap::<u64, Vec<u32>>::default();
            for w in blk * BLOCK..n.min((blk + 1) * BLOCK) {
                let c = words.count[w];
                let ids = words.word(w);
                if c <= 0 || ids.len() < 2 {
                    continue;
                }
                for p in ids.windows(2) {
                    let k = key(p[0], p[1]);
                    *counts.entry(k).or_insert(0) += c;
                    let list = where_.entry(k).or_default();
                    if list.last() != Some(&(w as u32)) {
                        list.push(w as u32);
                    }
                }
            }
            (counts, where_)
        })
        .collect();
    // Blocks are in word order, so appending keeps every position list sorted.
    let mut it = blocks.into_iter();
    let (mut counts, mut where_) = it.next().unwrap_or_default();
    for (c, w) in it {
        for (k, v) in c {
            *counts.entry(k).or_insert(0) += v;
        }
        for (k, mut v) in w {
            where_.entry(k).or_default().append(&mut v);
        }
    }
    (counts, where_)
}

/// A candidate merge in the heap, packed as `count << 64 | !pair` so that plain u128 order is the
/// merge order: higher count first, then the smaller pair. 16 bytes keep four children of a heap
/// node in one cache line; popping from the heap was the merge loop's main cost with fatter entries.
/// `count` may be stale (an upper bound) until the job reaches the top.
#[inline(always)]
fn job(count: i64, pair: u64) -> u128 {
    debug_assert!(count > 0);
    ((count as u128) << 64) | (!pair) as u128
}

#[inline(always)]
fn unjob(j: u128) -> (i64, u64) {
    ((j >> 64) as i64, !(j as u64))
}

/// Pair-count changes caused by merging one word, already weighted by the word's count.
struct MergeSink<'a> {
    counts: &'a mut FxMap<u64, i64>,
    new_words: &'a mut FxMap<u64, Vec<u32>>,
}

impl MergeSink<'_> {
    #[inline(always)]
    fn sub(&mut self, k: u64, c: i64) {
        *self.counts.entry(k).or_insert(0) -= c;
    }
    #[inline(always)]
    fn add(&mut self, k: u64, c: i64, w: u32) {
        *self.counts.entry(k).or_insert(0) += c;
        let list = self.new_words.entry(k).or_default();
        if list.last() != Some(&w) {
            list.push(w);
        }
    }
}

/// Merge every non-overlapping (a, b) in `ids`, leftmost first, into `z`; report the changed
/// neighbour pairs to `sink` (not (a, b) itself: the caller zeroes it after a full pass).
/// Returns the new length; the word is rewritten in place.
#[inline]
fn merge_word(
    ids: &mut [u32],
    a: u32,
    b: u32,
    z: u32,
    c: i64,
    w: u32,
    sink: &mut MergeSink,
) -> usize {
    let n = ids.len();
    // Most listed words still hold the pair, but stale entries are common after earlier merges.
    let Some(first) = ids.windows(2).position(|p| p[0] == a && p[1] == b) else {
        return n;
    };
    let mut out = first;
    let mut i = first;
    while i < n {
        if i + 1 < n && ids[i] == a && ids[i + 1] == b {
            if out > 0 {
                // ids[out - 1] is the last emitted id, possibly a z from the previous replacement.
                let x = ids[out - 1];
                sink.sub(key(x, a), c);
                sink.add(key(x, z), c, w);
            }
            if i + 2 < n {
                let y = ids[i + 2];
                sink.sub(key(b, y), c);
                sink.add(key(z, y), c, w);
            }
            ids[out] = z;
            i += 2;
        } else {
            ids[out] = ids[i];
            i += 1;
        }
        out += 1;
    }
    out
}

/// Learn up to `num_merges` merges from `words`; merge k creates token id 256 + k.
/// Stops early when no pair with a positive count is left.
pub fn learn_merges(words: &mut Words, num_merges: usize) -> Vec<Pair> {
    // A huge request usually ends early for lack of pairs; do not reserve for it up front.
    let mut merges = Vec::with_capacity(num_merges.min(1 << 20));
    if num_merges == 0 {
        return merges;
    }
    let (mut counts, mut where_) = count_pairs(words);
    // Every pair with a job has its word list in `where_`; a pair has at most one job at a time.
    where_.retain(|pair, _| counts[pair] > 0);
    let mut heap: QuaternaryHeap<u128> = where_
        .keys()
        .map(|&pair| job(counts[&pair], pair))
        .collect();
    log::info!(target: "rustbpe", "Starting merges: {} words, {} distinct pairs", words.len(), heap.len());

    let mut new_words: FxMap<u64, Vec<u32>> = FxMap::default();
    let mut last_percent = 0;
    let mut refreshes = 0u64;
    while merges.len() < num_merges {
        let Some(top) = heap.pop() else { break };
        let (count, pair) = unjob(top);
        // Lazy refresh: counts only fall after a job is pushed, so a stale job is re-queued with
        // its current count; the first job whose count is current is the true maximum.
        let current = counts.get(&pair).copied().unwrap_or(0);
        if current <= 0 {
            where_.remove(&pair);
            continue;
        }
        if current != count {
            heap.push(job(current, pair));
            refreshes += 1;
            continue;
        }
        let job_words = where_.remove(&pair).unwrap_or_default();

        let (a, b) = unkey(pair);
        let z = 256 + merges.len() as u32;
        merges.push((a, b));
        let mut sink = MergeSink {
            counts: &mut counts,
            new_words: &mut new_words,
        };
        for &w in &job_words {
            let wi = w as usize;
            let s = words.start[wi];
            let l = words.len[wi] as usize;
            let new_len = merge_word(
                &mut words.ids[s..s + l],
                a,
                b,
                z,
                words.count[wi],
                w,
                &mut sink,
            );
            words.len[wi] = new_len as u32;
        }
        // Every occurrence of (a, b) is gone: its word list is complete because a pair only gains
        // occurrences in the merge that creates its newer id, and that merge listed all of them.
        counts.remove(&pair);
        // Every pair that gained occurrences contains z, so it has no other live job.
        for (new_pair, ws) in new_words.drain() {
            let c = counts.get(&new_pair).copied().unwrap_or(0);
            if c > 0 {
                heap.push(job(c, new_pair));
                where_.insert(new_pair, ws);
            }
        }

        let percent = merges.len() * 100 / num_merges;
        if percent > last_percent {
            last_percent = percent;
            log::info!(
                target: "rustbpe",
                "Progress: {}% ({}/{} merges) - Last merge: ({}, {}) -> {} (frequency: {})",
                percent, merges.len(), num_merges, a, b, z, count
            );
        }
    }
    log::debug!(target: "rustbpe", "Heap: {} stale jobs refreshed, {} jobs left, {} pair counts kept", refreshes, heap.len(), counts.len());
    log::info!(target: "rustbpe", "Finished training: {} merges completed", merges.len());
    merges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words_of(items: &[(&str, i64)]) -> Words {
        Words::new(
            &items
                .iter()
                .map(|(s, c)| (s.as_bytes(), *c))
                .collect::<Vec<_>>(),
        )
    }

    fn pairs_of(ids: &[u32]) -> Vec<Pair> {
        ids.windows(2).map(|p| (p[0], p[1])).collect()
    }

    /// Merge one word with the bookkeeping: (new ids, count deltas of every pair except (a, b)
    /// itself, which the merge loop zeroes after a full pass), deltas sorted by pair.
    fn merge_one(ids: &[u32], a: u32, b: u32, z: u32) -> (Vec<u32>, Vec<(Pair, i64)>) {
        let mut ids = ids.to_vec();
        let mut counts = FxMap::default();
        let mut new_words = FxMap::default();
        let mut sink = MergeSink {
            counts: &mut counts,
            new_words: &mut new_words,
        };
        let n = merge_word(&mut ids, a, b, z, 1, 0, &mut sink);
        ids.truncate(n);
        let mut deltas: Vec<(Pair, i64)> = counts
            .into_iter()
            .map(|(k, v)| (unkey(k), v))
            .filter(|&(p, v)| v != 0 && p != (a, b))
            .collect();
        deltas.sort();
        (ids, deltas)
    }

    /// The true change in pair counts between two words, as a sorted list without zeros.
    fn diff(before: &[u32], after: &[u32], skip: Pair) -> Vec<(Pair, i64)> {
        let mut m = std::collections::BTreeMap::new();
        for p in pairs_of(before) {
            *m.entry(p).or_insert(0) -= 1;
        }
        for p in pairs_of(after) {
            *m.entry(p).or_insert(0) += 1;
        }
        m.into_iter()
            .filter(|&(p, v)| v != 0 && p != skip)
            .collect()
    }

    #[test]
    fn pairs_of_words() {
        assert!(pairs_of(&[]).is_empty());
        assert!(pairs_of(&[7]).is_empty());
        assert_eq!(pairs_of(&[1, 2, 3]), vec![(1, 2), (2, 3)]);
    }

    #[test]
    fn merge_normal_and_repeated() {
        assert_eq!(merge_one(&[1, 2, 3], 1, 2, 99).0, vec![99, 3]);
        assert_eq!(merge_one(&[1, 2, 1, 2], 1, 2, 99).0, vec![99, 99]);
        assert_eq!(merge_one(&[5, 6, 7], 1, 2, 99).0, vec![5, 6, 7]);
        assert_eq!(
            merge_one(&[1, 2, 5, 1, 2, 6], 1, 2, 99).0,
            vec![99, 5, 99, 6]
        );
    }

    #[test]
    fn merge_overlapping_is_leftmost_non_overlapping() {
        assert_eq!(merge_one(&[97, 97, 97], 97, 97, 256).0, vec![256, 97]);
        assert_eq!(merge_one(&[97, 97, 97, 97], 97, 97, 256).0, vec![256, 256]);
    }

    #[test]
    fn merge_deltas_exact() {
        // [1,2,3,1,2] with (1,2)->99 becomes [99,3,99]; (1,2) -2 is applied by the caller.
        let (ids, deltas) = merge_one(&[1, 2, 3, 1, 2], 1, 2, 99);
        assert_eq!(ids, vec![99, 3, 99]);
        assert_eq!(
            deltas,
            vec![((2, 3), -1), ((3, 1), -1), ((3, 99), 1), ((99, 3), 1)]
        );
        // Adjacent replacements: (z, a) from the first cancels against the second's left side.
        let (ids, deltas) = merge_one(&[1, 2, 1, 2], 1, 2, 99);
        assert_eq!(ids, vec![99, 99]);
        assert_eq!(deltas, vec![((2, 1), -1), ((99, 99), 1)]);
        let (_, deltas) = merge_one(&[97, 97, 97], 97, 97, 256);
        assert_eq!(deltas, vec![((256, 97), 1)]);
    }

    #[test]
    fn merge_deltas_equal_true_pair_changes() {
        let mut state: u64 = 777;
        for _ in 0..2000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (state >> 60) as usize;
            let word: Vec<u32> = (0..len).map(|i| ((state >> (2 * i)) & 3) as u32).collect();
            for (a, b) in [(0, 1), (1, 1), (2, 0)] {
                let (after, deltas) = merge_one(&word, a, b, 9);
                assert_eq!(deltas, diff(&word, &after, (a, b)), "{word:?} ({a},{b})");
            }
        }
    }

    #[test]
    fn count_pairs_weighted() {
        let words = words_of(&[("abc", 3), ("bcd", 2), ("x", 9), ("zz", 0), ("aa", 1)]);
        let (counts, where_) = count_pairs(&words);
        let get = |a: u8, b: u8| counts.get(&key(a as u32, b as u32)).copied();
        assert_eq!(get(b'a', b'b'), Some(3));
        assert_eq!(get(b'b', b'c'), Some(5));
        assert_eq!(get(b'c', b'd'), Some(2));
        assert_eq!(get(b'a', b'a'), Some(1));
        assert_eq!(get(b'z', b'z'), None);
        assert_eq!(where_[&key(b'b' as u32, b'c' as u32)], vec![0, 1]);
        let (counts, _) = count_pairs(&words_of(&[]));
        assert!(counts.is_empty());
    }

    #[test]
    fn train_picks_most_frequent() {
        let mut words = words_of(&[("ab", 10), ("cd", 5)]);
        assert_eq!(learn_merges(&mut words, 1), vec![(97, 98)]);
    }

    #[test]
    fn train_tie_break_smallest_pair() {
        // (c,d) and (a,b) both have count 5; the smaller pair wins.
        let mut words = words_of(&[("cd", 5), ("ab", 5)]);
        assert_eq!(learn_merges(&mut words, 2), vec![(97, 98), (99, 100)]);
    }

    #[test]
    fn train_stops_when_no_pairs_remain() {
        let mut words = words_of(&[("ab", 3)]);
        assert_eq!(learn_merges(&mut words, 10), vec![(97, 98)]);
        let mut words = words_of(&[("a", 3)]);
        assert!(learn_merges(&mut words, 10).is_empty());
    }

    #[test]
    fn train_chained_merges() {
        let mut words = words_of(&[("aaa", 10)]);
        assert_eq!(learn_merges(&mut words, 2), vec![(97, 97), (256, 97)]);
        assert_eq!(words.word(0), &[257]);
    }

    #[test]
    fn train_worked_example() {
        // "hello hello hello world world" split by the GPT-4 pattern.
        let mut words = words_of(&[("hello", 1), (" hello", 2), (" world", 2)]);
        let merges = learn_merges(&mut words, 4);
        let e = |c: char| c as u32;
        assert_eq!(
            merges,
            vec![
                (e('e'), e('l')),
                (e('h'), 256),
                (e('l'), e('o')),
                (257, 258)
            ]
        );
    }

    /// Slow reference: recount every pair over every word at each step.
    fn naive(items: &[(Vec<u8>, i64)], num_merges: usize) -> Vec<Pair> {
        let mut words: Vec<(Vec<u32>, i64)> = items
            .iter()
            .map(|(b, c)| (b.iter().map(|&x| x as u32).collect(), *c))
            .collect();
        let mut merges = Vec::new();
        while merges.len() < num_merges {
            let mut counts: std::collections::BTreeMap<Pair, i64> = Default::default();
            for (ids, c) in &words {
                for p in ids.windows(2) {
                    *counts.entry((p[0], p[1])).or_insert(0) += c;
                }
            }
            // Max count, smallest pair on ties (BTreeMap iterates pairs in increasing order).
            let Some((&best, _)) = counts.iter().filter(|(_, &c)| c > 0).fold(
                None,
                |acc: Option<(&Pair, &i64)>, (p, c)| match acc {
                    Some((_, ac)) if ac >= c => acc,
                    _ => Some((p, c)),
                },
            ) else {
                break;
            };
            let z = 256 + merges.len() as u32;
            for (ids, _) in words.iter_mut() {
                let mut out = Vec::with_capacity(ids.len());
                let mut i = 0;
                while i < ids.len() {
                    if i + 1 < ids.len() && (ids[i], ids[i + 1]) == best {
                        out.push(z);
                        i += 2;
                    } else {
                        out.push(ids[i]);
                        i += 1;
                    }
                }
                *ids = out;
            }
            merges.push(best);
        }
        merges
    }

    #[test]
    fn matches_naive_reference() {
        let mut state: u64 = 12345;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20 {
            let nwords = 1 + (next() % 40) as usize;
            let alphabet = 2 + round % 4; // small alphabets force long runs and many ties
            let items: Vec<(Vec<u8>, i64)> = (0..nwords)
                .map(|_| {
                    let len = (next() % 12) as usize;
                    let bytes = (0..len)
                        .map(|_| b'a' + (next() % alphabet as u64) as u8)
                        .collect();
                    (bytes, (next() % 5) as i64)
                })
                .collect();
            let want = naive(&items, 30);
            let mut words = Words::new(&items);
            assert_eq!(
                learn_merges(&mut words, 30),
                want,
                "round {round}: {items:?}"
            );
        }
    }

    #[test]
    fn chunk_counter_counts_across_batches() {
        let splitter = Splitter::new(crate::GPT4_PATTERN).unwrap();
        let mut counter = ChunkCounter::new(splitter);
        counter.add_texts(&["hello world", "hello"]);
        counter.add_texts(&[String::from(" world hello")]);
        assert_eq!(counter.texts_seen(), 3);
        let mut counts = counter.into_counts();
        counts.sort();
        let counts: Vec<(&[u8], i64)> = counts.iter().map(|(s, c)| (&s[..], *c)).collect();
        let long = "averyveryverylongwordindeed";
        assert_eq!(
            counts,
            vec![(&b" hello"[..], 1), (b" world", 2), (b"hello", 2)]
        );
        // Short keys packed at the end of a text, in its middle, and long keys, all across batches.
        let mut counter = ChunkCounter::new(Splitter::new(crate::GPT4_PATTERN).unwrap());
        let texts = [
            format!("{long} x {long}"),
            "xxxxxxxxxxxxxxx".into(),
            "xxxxxxxxxxxxxxx y".into(),
        ];
        counter.add_texts(&texts);
        counter.add_texts(&[long, "\0\0", "\0\0 "]);
        let mut counts = counter.into_counts();
        counts.sort();
        let mut want: Vec<(Vec<u8>, i64)> = vec![
            (b" ".to_vec(), 1),
            (b" x".to_vec(), 1),
            (b" y".to_vec(), 1),
            (b" averyveryverylongwordindeed".to_vec(), 1),
            (b"\0\0".to_vec(), 2),
            (long.as_bytes().to_vec(), 2),
            (b"xxxxxxxxxxxxxxx".to_vec(), 2),
        ];
        want.sort();
        assert_eq!(counts, want);
    }
}
