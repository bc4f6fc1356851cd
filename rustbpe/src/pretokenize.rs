//! Regex pre-tokenization: cut text into the chunks that BPE works inside of.
//!
//! The reference semantics are `fancy_regex::Regex::find_iter` (leftmost-first alternation,
//! non-overlapping matches, unmatched text dropped). fancy-regex runs a backtracking VM, which is
//! the slowest part of training, so the GPT-4 family of patterns (`\p{N}{1,K}` digit groups, the
//! default pattern and nanochat's) has a hand-written matcher that produces exactly the same
//! chunks. It reads its character classes from `regex-syntax`, the parser fancy-regex itself uses,
//! so both agree on every code point; tests compare the two on adversarial and real text.

use regex_syntax::hir::{Class, Hir, HirKind};

/// The GPT-4 (cl100k) split pattern with the digit-group length left open: `GPT4_PREFIX` + K + `GPT4_SUFFIX`.
const GPT4_PREFIX: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,";
const GPT4_SUFFIX: &str = r"}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// rustbpe's default split pattern: GPT-4's, numbers in groups of at most 3 digits.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// A compiled split pattern.
#[derive(Clone, Debug)]
pub enum Splitter {
    /// The empty pattern: an untrained tokenizer yields no chunks at all.
    Empty,
    /// Hand-written matcher for the GPT-4 pattern family.
    Gpt4(Gpt4Splitter),
    /// Any other pattern, run by fancy-regex.
    Regex(Box<fancy_regex::Regex>),
}

impl Splitter {
    /// Compile `pattern`, choosing the fast matcher when the pattern is one it implements exactly.
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Ok(Splitter::Empty);
        }
        if let Some(max_digits) = gpt4_digit_group(pattern) {
            return Ok(Splitter::Gpt4(Gpt4Splitter::new(max_digits)));
        }
        Self::new_regex(pattern)
    }

    /// Compile `pattern` with fancy-regex even when a fast matcher exists (the reference path).
    pub fn new_regex(pattern: &str) -> Result<Self, String> {
        fancy_regex::Regex::new(pattern)
            .map(|re| Splitter::Regex(Box::new(re)))
            .map_err(|e| e.to_string())
    }

    /// Call `f` on every chunk of `text`, in order.
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
        match self {
            Splitter::Empty => {}
            Splitter::Gpt4(s) => s.for_each_chunk(text, f),
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    match m {
                        Ok(m) => f(m.as_str()),
                        // A backtracking-limit error ends the scan of this text, as it does in
                        // find_iter users that stop at the first error.
                        Err(e) => {
                            log::warn!(target: "rustbpe", "regex error, rest of the text skipped: {e}");
                            break;
                        }
                    }
                }
            }
        }
    }

    /// All chunks of `text` as a vector (convenience for encoding and tests).
    pub fn chunks<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut out = Vec::new();
        self.for_each_chunk(text, |c| out.push(c));
        out
    }
}

/// If `pattern` is exactly the GPT-4 pattern with `\p{N}{1,K}` (1 <= K <= 9), return K.
fn gpt4_digit_group(pattern: &str) -> Option<usize> {
    let k = pattern
        .strip_prefix(GPT4_PREFIX)?
        .strip_suffix(GPT4_SUFFIX)?;
    if k.len() == 1 {
        let d = k.as_bytes()[0];
        if (b'1'..=b'9').contains(&d) {
            return Some((d - b'0') as usize);
        }
    }
    None
}

// Character classes of the pattern. LETTER, NUMBER and SPACE are disjoint (Unicode general
// categories L and N never carry White_Space); PUNCT is "none of them", i.e. `[^\s\p{L}\p{N}]`.
const PUNCT: u8 = 0;
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 3;

/// Characters that `(?i:x)` matches for the letters of the contractions, as small sorted lists.
#[derive(Clone, Debug)]
struct Contractions {
    sdmt: Vec<char>,
    l: Vec<char>,
    v: Vec<char>,
    e: Vec<char>,
    r: Vec<char>,
}

/// Matcher for the GPT-4 split pattern family, branch by branch:
/// 1. `'(?i:[sdmt]|ll|ve|re)`  2. `[^\r\n\p{L}\p{N}]?+\p{L}+`  3. `\p{N}{1,K}`
/// 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*`  5. `\s*[\r\n]`  6. `\s+(?!\S)`  7. `\s+`.
///
/// Every character starts a match of some branch, so the chunks tile the text.
#[derive(Clone, Debug)]
pub struct Gpt4Splitter {
    max_digits: usize,
    /// Class of every Basic Multilingual Plane code point (64 KiB, indexed directly).
    bmp: Vec<u8>,
    /// Sorted (start, end, class) ranges above the BMP; code points not listed are PUNCT.
    astral: Vec<(u32, u32, u8)>,
    contractions: Contractions,
}

fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir: Hir = regex_syntax::Parser::new()
        .parse(pattern)
        .expect("built-in class pattern parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(cls)) => cls
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        HirKind::Literal(lit) => {
            // A class with a single member is simplified to a literal.
            let c = std::str::from_utf8(&lit.0)
                .ok()
                .and_then(|s| s.chars().next())
                .expect("literal is one char");
            vec![(c as u32, c as u32)]
        }
        other => panic!("unexpected HIR for {pattern}: {other:?}"),
    }
}

fn class_chars(pattern: &str) -> Vec<char> {
    class_ranges(pattern)
        .into_iter()
        .flat_map(|(a, b)| (a..=b).filter_map(char::from_u32))
        .collect()
}

impl Gpt4Splitter {
    /// Build the matcher for `\p{N}{1,max_digits}`.
    pub fn new(max_digits: usize) -> Self {
        let mut bmp = vec![PUNCT; 0x10000];
        let mut astral = Vec::new();
        for (pattern, class) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (a, b) in class_ranges(pattern) {
                for cp in a..=b.min(0xFFFF) {
                    bmp[cp as usize] = class;
                }
                if b > 0xFFFF {
                    astral.push((a.max(0x10000), b, class));
                }
            }
        }
        astral.sort_unstable();
        let contractions = Contractions {
            sdmt: class_chars(r"(?i:[sdmt])"),
            l: class_chars(r"(?i:l)"),
            v: class_chars(r"(?i:v)"),
            e: class_chars(r"(?i:e)"),
            r: class_chars(r"(?i:r)"),
        };
        Gpt4Splitter {
            max_digits,
            bmp,
            astral,
            contractions,
        }
    }

    #[inline(always)]
    fn class_of(&self, c: u32) -> u8 {
        if c < 0x10000 {
            self.bmp[c as usize]
        } else {
            match self.astral.binary_search_by(|&(a, b, _)| {
                if b < c {
                    std::cmp::Ordering::Less
                } else if a > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            }) {
                Ok(i) => self.astral[i].2,
                Err(_) => PUNCT,
            }
        }
    }

    /// Call `f` on every chunk of `text`, in order.
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let end = self.match_at(b, i);
            debug_assert!(end > i && text.is_char_boundary(end));
            // SAFETY: match_at only returns char boundaries (it advances by whole UTF-8 sequences).
            f(unsafe { text.get_unchecked(i..end) });
            i = end;
        }
    }

    /// End of the chunk that starts at byte `i` (a char boundary, `i < b.len()`).
    #[inline]
    fn match_at(&self, b: &[u8], i: usize) -> usize {
        let (c0, n0) = decode(b, i);
        let k0 = self.class_of(c0);
        let j = i + n0;

        // 1. contractions
        if c0 == '\'' as u32 {
            if let Some(end) = self.contraction(b, j) {
                return end;
            }
        }
        // 2. optional single non-letter/non-digit/non-newline, then letters
        if k0 == LETTER {
            return self.run(b, j, LETTER);
        }
        if k0 != NUMBER && c0 != '\r' as u32 && c0 != '\n' as u32 && j < b.len() {
            let (c1, n1) = decode(b, j);
            if self.class_of(c1) == LETTER {
                return self.run(b, j + n1, LETTER);
            }
        }
        // 3. up to max_digits numbers
        if k0 == NUMBER {
            let mut end = j;
            let mut taken = 1;
            while taken < self.max_digits && end < b.len() {
                let (c, n) = decode(b, end);
                if self.class_of(c) != NUMBER {
                    break;
                }
                end += n;
                taken += 1;
            }
            return end;
        }
        // 4. optional space, punctuation run, trailing newlines
        let punct_start = if k0 == PUNCT {
            Some(j)
        } else if c0 == ' ' as u32 && j < b.len() {
            let (c1, n1) = decode(b, j);
            (self.class_of(c1) == PUNCT).then_some(j + n1)
        } else {
            None
        };
        if let Some(start) = punct_start {
            let mut end = self.run(b, start, PUNCT);
            while end < b.len() && (b[end] == b'\r' || b[end] == b'\n') {
                end += 1;
            }
            return end;
        }
        // Only whitespace is left (k0 == SPACE).
        debug_assert_eq!(k0, SPACE);
        let mut end = j;
        let mut last_newline_end = if c0 == '\r' as u32 || c0 == '\n' as u32 {
            j
        } else {
            0
        };
        let mut last_start = i;
        while end < b.len() {
            let (c, n) = decode(b, end);
            if self.class_of(c) != SPACE {
                break;
            }
            if c == '\r' as u32 || c == '\n' as u32 {
                last_newline_end = end + n;
            }
            last_start = end;
            end += n;
        }
        // 5. whitespace ending with the last newline of the run
        if last_newline_end > 0 {
            return last_newline_end;
        }
        // 6. whitespace not followed by non-whitespace: at the end of the text the whole run,
        // before a non-space character the run minus its last character (if that leaves any).
        if end == b.len() || last_start > i {
            return if end == b.len() { end } else { last_start };
        }
        // 7. a single whitespace character before non-whitespace
        end
    }

    /// Branch 1 after the apostrophe at `j`: `(?i:[sdmt]|ll|ve|re)`.
    #[inline]
    fn contraction(&self, b: &[u8], j: usize) -> Option<usize> {
        if j >= b.len() {
            return None;
        }
        let (c1, n1) = decode(b, j);
        let c1 = char::from_u32(c1)?;
        let k = &self.contractions;
        if k.sdmt.contains(&c1) {
            return Some(j + n1);
        }
        let second = if k.l.contains(&c1) {
            &k.l
        } else if k.v.contains(&c1) || k.r.contains(&c1) {
            &k.e
        } else {
            return None;
        };
        let j2 = j + n1;
        if j2 >= b.len() {
            return None;
        }
        let (c2, n2) = decode(b, j2);
        second.contains(&char::from_u32(c2)?).then_some(j2 + n2)
    }

    /// End of the run of `class` characters starting at `j`.
    #[inline]
    fn run(&self, b: &[u8], mut j: usize, class: u8) -> usize {
        while j < b.len() {
            // Byte-at-a-time for ASCII, the bulk of most text; decode only multi-byte characters.
            let c = b[j];
            if c < 0x80 {
                if self.bmp[c as usize] != class {
                    break;
                }
                j += 1;
                continue;
            }
            let (c, n) = decode(b, j);
            if self.class_of(c) != class {
                break;
            }
            j += n;
        }
        j
    }
}

/// Decode the UTF-8 scalar value at byte `i` of valid UTF-8 `b`: (code point, byte length).
#[inline(always)]
fn decode(b: &[u8], i: usize) -> (u32, usize) {
    let b0 = b[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((b[i + 1] as u32 & 0x3F) << 12)
                | ((b[i + 2] as u32 & 0x3F) << 6)
                | (b[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

    fn both(pattern: &str) -> (Splitter, Splitter) {
        let fast = Splitter::new(pattern).unwrap();
        assert!(matches!(fast, Splitter::Gpt4(_)), "fast path not chosen");
        (fast, Splitter::new_regex(pattern).unwrap())
    }

    fn assert_same(fast: &Splitter, slow: &Splitter, text: &str) {
        assert_eq!(fast.chunks(text), slow.chunks(text), "text: {text:?}");
    }

    #[test]
    fn recognises_pattern_family() {
        assert_eq!(gpt4_digit_group(GPT4_PATTERN), Some(3));
        assert_eq!(gpt4_digit_group(NANOCHAT_PATTERN), Some(2));
        assert_eq!(gpt4_digit_group(&format!("(?:{GPT4_PATTERN})")), None);
        assert_eq!(gpt4_digit_group(r"\w+"), None);
        assert!(matches!(Splitter::new("").unwrap(), Splitter::Empty));
        assert!(matches!(Splitter::new(r"\w+").unwrap(), Splitter::Regex(_)));
        assert!(Splitter::new(r"(unclosed").is_err());
    }

    #[test]
    fn gpt4_examples() {
        let s = Splitter::new(GPT4_PATTERN).unwrap();
        assert_eq!(
            s.chunks("Hello world, it's 12345!\n\n  x"),
            vec!["Hello", " world", ",", " it", "'s", " ", "123", "45", "!\n\n", " ", " x"]
        );
        assert_eq!(s.chunks("   "), vec!["   "]);
        assert_eq!(s.chunks("a  \n\t b"), vec!["a", "  \n", "\t", " b"]);
    }

    #[test]
    fn matches_fancy_regex_on_tricky_strings() {
        let cases = [
            "",
            "'",
            "''",
            "'s",
            "'S",
            "'\u{17F}",
            "'LL'Ve're'll'lL'x'sa",
            "don't WE'LL they'RE",
            "  hello   world  ",
            "x\r\ny\n\n\nz \n \n w",
            "\u{a0}\u{a0}word\u{2028}next\u{85}\u{3000}end",
            "1234567 ٣٤٥٦ Ⅻ ½¾ x²",
            "e\u{301}te\u{301} caf\u{e9} na\u{ef}ve",
            "你好世界 🙂🙃 emoji👍🏽ok",
            "!!! ?? ... ;;\n\n;; \t\t--",
            " .\r\n\r\n. ,a ,1 ,\n",
            "𝐀𝐁𝐂 𝟏𝟐𝟑 𐍈𐍉",
            "tab\there\tthere\t\t",
            "end with space ",
            "end with spaces\t \t",
            "\n",
            " \n",
            " ",
            "'\n's",
        ];
        for pattern in [GPT4_PATTERN, NANOCHAT_PATTERN] {
            let (fast, slow) = both(pattern);
            for text in cases {
                assert_same(&fast, &slow, text);
            }
        }
    }

    #[test]
    fn matches_fancy_regex_on_random_strings() {
        // Random strings over an alphabet that exercises every branch and class boundary.
        let alphabet: Vec<char> = "aZé'sStTlLvVeErRdDmM\u{17F}\u{212A}0 9٣Ⅻ½ \t\r\n\u{a0}\u{85}\u{2028}\u{3000}.,!?-_\"#你🙂\u{301}𝐀𝟏"
            .chars()
            .collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            // xorshift64*: a deterministic generator, no dependency needed.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for pattern in [GPT4_PATTERN, NANOCHAT_PATTERN] {
            let (fast, slow) = both(pattern);
            for _ in 0..3000 {
                let len = (next() % 24) as usize;
                let text: String = (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect();
                assert_same(&fast, &slow, &text);
            }
        }
    }

    #[test]
    fn contraction_case_folding_matches_fancy_regex() {
        // Every code point after an apostrophe, followed by 'e' and by 'L' to cover two-letter forms.
        let (fast, slow) = both(GPT4_PATTERN);
        for cp in (0u32..0x3000).chain(0x1E00..0x1F00).chain(0x2100..0x2200) {
            if let Some(c) = char::from_u32(cp) {
                for tail in ["e", "L", ""] {
                    let text = format!("'{c}{tail}");
                    assert_same(&fast, &slow, &text);
                }
            }
        }
    }

    #[test]
    fn matches_fancy_regex_on_source_text() {
        // Real text with code, prose, apostrophes and every kind of whitespace run.
        for pattern in [GPT4_PATTERN, NANOCHAT_PATTERN] {
            let (fast, slow) = both(pattern);
            for text in [include_str!("train.rs"), include_str!("tokenizer.rs")] {
                assert_same(&fast, &slow, text);
            }
        }
    }

    #[test]
    fn classes_cover_astral_planes() {
        let (fast, slow) = both(GPT4_PATTERN);
        let text: String = (0x10000u32..0x20000)
            .step_by(7)
            .filter_map(char::from_u32)
            .collect();
        assert_same(&fast, &slow, &text);
    }
}
