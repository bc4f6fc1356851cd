//! The trained tokenizer: a split pattern plus an ordered list of merges.
//!
//! Token ids 0..256 are the raw bytes; merge k (0-based) creates id 256 + k from a pair of older
//! ids. Encoding follows BPE priority order (the pair with the lowest merged id first), which is
//! what tiktoken does with the ranks from [`Tokenizer::mergeable_ranks`].

use std::fmt;

use hashbrown::HashMap;
use rayon::prelude::*;
use rustc_hash::FxBuildHasher;

use crate::pretokenize::{Splitter, GPT4_PATTERN};
use crate::train::{learn_merges, ChunkCounter, Pair};

/// Everything that can go wrong when training or decoding, with a message fit for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerError {
    /// The requested vocabulary cannot even hold the 256 byte tokens.
    VocabTooSmall(i64),
    /// The requested vocabulary does not fit the u32 token ids.
    VocabTooLarge(i64),
    /// The split pattern does not compile (fancy-regex's message).
    InvalidPattern(String),
    /// Training was asked to read texts in batches of zero.
    ZeroBufferSize,
    /// Decoding met an id that is neither a byte nor a learned merge.
    UnknownToken(u32),
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::VocabTooSmall(v) => write!(
                f,
                "vocab_size must be at least 256 (the byte tokens), got {v}"
            ),
            TokenizerError::VocabTooLarge(v) => {
                write!(f, "vocab_size must be at most {}, got {v}", u32::MAX)
            }
            TokenizerError::InvalidPattern(e) => write!(f, "Invalid regex pattern: {e}"),
            TokenizerError::ZeroBufferSize => write!(f, "buffer_size must be at least 1"),
            TokenizerError::UnknownToken(id) => write!(f, "Unknown token id: {id}"),
        }
    }
}

impl std::error::Error for TokenizerError {}

/// A byte-level BPE tokenizer.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: Vec<Pair>,
    /// (a, b) packed as a u64 -> merged id, for encoding.
    ranks: HashMap<u64, u32, FxBuildHasher>,
    /// Bytes of every token id.
    token_bytes: Vec<Vec<u8>>,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokenizer {
    /// An untrained tokenizer: empty pattern (encodes everything to nothing), no merges.
    pub fn new() -> Self {
        Tokenizer::from_merges("", Vec::new()).expect("the empty pattern compiles")
    }

    /// A tokenizer from a pattern and merges (merge k creates id 256 + k from older ids).
    pub fn from_merges(pattern: &str, merges: Vec<Pair>) -> Result<Self, TokenizerError> {
        let splitter = compile(pattern)?;
        Ok(Self::assemble(pattern, splitter, merges))
    }

    fn assemble(pattern: &str, splitter: Splitter, merges: Vec<Pair>) -> Self {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut ranks = HashMap::with_capacity_and_hasher(merges.len(), FxBuildHasher);
        for (k, &(a, b)) in merges.iter().enumerate() {
            let id = 256 + k as u32;
            let mut bytes = token_bytes[a as usize].clone();
            bytes.extend_from_slice(&token_bytes[b as usize]);
            token_bytes.push(bytes);
            ranks.insert(pack(a, b), id);
        }
        Tokenizer {
            pattern: pattern.to_string(),
            splitter,
            merges,
            ranks,
            token_bytes,
        }
    }

    /// Number of merges `vocab_size` asks for, or why it is not a valid size.
    pub fn merges_for_vocab_size(vocab_size: i64) -> Result<usize, TokenizerError> {
        if vocab_size < 256 {
            return Err(TokenizerError::VocabTooSmall(vocab_size));
        }
        if vocab_size > u32::MAX as i64 {
            return Err(TokenizerError::VocabTooLarge(vocab_size));
        }
        Ok(vocab_size as usize - 256)
    }

    /// A chunk counter for `pattern` (None = the GPT-4 default): phase A of training, fed by the caller.
    pub fn chunk_counter(pattern: Option<&str>) -> Result<(String, ChunkCounter), TokenizerError> {
        let pattern = pattern.unwrap_or(GPT4_PATTERN).to_string();
        let splitter = compile(&pattern)?;
        Ok((pattern, ChunkCounter::new(splitter)))
    }

    /// Phase B of training: learn `vocab_size - 256` merges from the counted chunks and become
    /// that tokenizer (fewer merges if the data runs out of pairs).
    pub fn train_from_counts(
        &mut self,
        pattern: &str,
        counter: ChunkCounter,
        vocab_size: i64,
    ) -> Result<(), TokenizerError> {
        let num_merges = Self::merges_for_vocab_size(vocab_size)?;
        let splitter = compile(pattern)?;
        let texts = counter.texts_seen();
        let mut words = counter.into_words();
        log::info!(target: "rustbpe", "Processed {} sequences total, {} unique", texts, words.len());
        let merges = learn_merges(&mut words, num_merges);
        *self = Self::assemble(pattern, splitter, merges);
        Ok(())
    }

    /// Train on `texts`, read in batches of `buffer_size` (pure-Rust convenience).
    pub fn train<I, S>(
        &mut self,
        texts: I,
        vocab_size: i64,
        buffer_size: usize,
        pattern: Option<&str>,
    ) -> Result<(), TokenizerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str> + Sync,
    {
        Self::merges_for_vocab_size(vocab_size)?;
        if buffer_size == 0 {
            return Err(TokenizerError::ZeroBufferSize);
        }
        let (pattern, mut counter) = Self::chunk_counter(pattern)?;
        let mut buf = Vec::with_capacity(buffer_size.min(1 << 16));
        for text in texts {
            buf.push(text);
            if buf.len() == buffer_size {
                counter.add_texts(&buf);
                buf.clear();
            }
        }
        counter.add_texts(&buf);
        self.train_from_counts(&pattern, counter, vocab_size)
    }

    /// The split pattern ("" when untrained).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The learned merges in order.
    pub fn merges(&self) -> &[Pair] {
        &self.merges
    }

    /// 256 + number of merges.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// (token bytes, id) for every token, ids increasing: the input tiktoken needs.
    pub fn mergeable_ranks(&self) -> Vec<(Vec<u8>, u32)> {
        self.token_bytes
            .iter()
            .enumerate()
            .map(|(id, b)| (b.clone(), id as u32))
            .collect()
    }

    /// Bytes of token `id`, if it exists.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(|b| b.as_slice())
    }

    /// Encode one text: split it, then BPE each chunk independently.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.splitter
            .for_each_chunk(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out));
        out
    }

    /// Encode many texts in parallel; results in input order, each equal to [`Tokenizer::encode`].
    pub fn batch_encode<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Vec<Vec<u32>> {
        texts.par_iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// BPE one chunk: repeatedly apply the lowest-ranked mergeable pair, at all of its (non-overlapping,
    /// leftmost-first) occurrences. Merging every occurrence at once equals one-at-a-time merging:
    /// pairs created by the merge involve the newer id and so rank after the pair just applied.
    fn encode_chunk(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = bytes.iter().map(|&b| b as u32).collect();
        while ids.len() >= 2 {
            let best = ids
                .windows(2)
                .filter_map(|p| self.ranks.get(&pack(p[0], p[1])).copied())
                .min();
            let Some(new_id) = best else { break };
            let (a, b) = self.merges[(new_id - 256) as usize];
            let mut w = 0;
            let mut r = 0;
            while r < ids.len() {
                if r + 1 < ids.len() && ids[r] == a && ids[r + 1] == b {
                    ids[w] = new_id;
                    r += 2;
                } else {
                    ids[w] = ids[r];
                    r += 1;
                }
                w += 1;
            }
            ids.truncate(w);
        }
        out.extend_from_slice(&ids);
    }

    /// Concatenated bytes of `ids` (they need not form valid UTF-8).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let bytes = self
                .token_bytes(id)
                .ok_or(TokenizerError::UnknownToken(id))?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }
}

#[inline(always)]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

fn compile(pattern: &str) -> Result<Splitter, TokenizerError> {
    Splitter::new(pattern).map_err(TokenizerError::InvalidPattern)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained(merges: Vec<Pair>) -> Tokenizer {
        Tokenizer::from_merges(r"\w+", merges).unwrap()
    }

    #[test]
    fn new_and_default_are_empty() {
        for t in [Tokenizer::new(), Tokenizer::default()] {
            assert_eq!(t.pattern(), "");
            assert!(t.merges().is_empty());
            assert_eq!(t.vocab_size(), 256);
            assert!(t.encode("anything at all").is_empty());
        }
    }

    #[test]
    fn encode_without_merges_is_bytes() {
        assert_eq!(trained(vec![]).encode("hi"), vec![104, 105]);
    }

    #[test]
    fn encode_chained_merges() {
        let t = trained(vec![(97, 97), (256, 97)]);
        assert_eq!(t.encode("aaa"), vec![257]);
        assert_eq!(t.encode("aaaa"), vec![256, 256]);
        assert_eq!(t.encode("aaaaa"), vec![256, 257]);
        // \w+ drops the space; chunks are encoded independently.
        assert_eq!(t.encode("aa aaa"), vec![256, 257]);
    }

    #[test]
    fn encode_prefers_lowest_rank() {
        // (b,c) was learned before (a,b): "abc" -> a + bc even though ab comes first.
        let t = trained(vec![(98, 99), (97, 98)]);
        assert_eq!(t.encode("abc"), vec![97, 256]);
        assert_eq!(t.encode("abd"), vec![257, 100]);
    }

    #[test]
    fn mergeable_ranks() {
        let t = trained(vec![]);
        let r = t.mergeable_ranks();
        assert_eq!(r.len(), 256);
        assert_eq!(r[65], (vec![65], 65));
        let t = trained(vec![(97, 98)]);
        assert_eq!(t.mergeable_ranks()[256], (b"ab".to_vec(), 256));
        let t = trained(vec![(97, 98), (256, 99)]);
        assert_eq!(t.mergeable_ranks()[257], (b"abc".to_vec(), 257));
        assert_eq!(t.vocab_size(), 258);
    }

    #[test]
    fn decode_roundtrip_and_errors() {
        let t = trained(vec![(97, 98), (256, 99)]);
        assert_eq!(t.decode_bytes(&t.encode("abcab")).unwrap(), b"abcab");
        assert_eq!(t.decode_bytes(&[0xC3, 0xA9]).unwrap(), "é".as_bytes());
        assert_eq!(t.decode_bytes(&[]).unwrap(), b"");
        assert_eq!(
            t.decode_bytes(&[97, 300]),
            Err(TokenizerError::UnknownToken(300))
        );
    }

    #[test]
    fn train_end_to_end() {
        let mut t = Tokenizer::new();
        t.train(["hello hello hello world world"], 260, 8192, None)
            .unwrap();
        assert_eq!(t.pattern(), GPT4_PATTERN);
        assert_eq!(t.vocab_size(), 260);
        assert_eq!(t.token_bytes(259), Some(&b"hello"[..]));
        assert_eq!(
            t.encode("hello world"),
            vec![259, 32, 119, 111, 114, 108, 100]
        );
        let ab: Vec<String> = (0..10)
            .map(|_| "ab".into())
            .chain((0..5).map(|_| "cd".into()))
            .collect();
        t.train(&ab, 257, 3, Some(r"\w+")).unwrap();
        assert_eq!(t.merges(), &[(97, 98)]);
    }

    #[test]
    fn train_rejects_bad_arguments() {
        let mut t = Tokenizer::new();
        assert_eq!(
            t.train(["x"], 255, 10, None),
            Err(TokenizerError::VocabTooSmall(255))
        );
        assert!(matches!(
            t.train(["x"], 300, 10, Some("(")),
            Err(TokenizerError::InvalidPattern(_))
        ));
        assert_eq!(
            t.train(["x"], 300, 0, None),
            Err(TokenizerError::ZeroBufferSize)
        );
        // A failed call leaves the tokenizer untouched.
        assert_eq!(t.pattern(), "");
        let msg = TokenizerError::VocabTooSmall(10).to_string();
        assert!(msg.contains("at least 256"), "{msg}");
    }
}
