//! rustbpe: train a GPT-4 style byte-level BPE tokenizer fast, export it for tiktoken.
//!
//! The algorithm lives in plain Rust modules with no Python types:
//! - [`pretokenize`]: the regex pre-split (fancy-regex, plus an exact fast path for GPT-4 patterns);
//! - [`train`]: parallel chunk counting and the incremental, heap-based merge loop;
//! - [`tokenizer`]: the trained [`Tokenizer`] (encode, decode, mergeable ranks).
//!
//! The Python module `rustbpe` is a thin binding in `python.rs`, compiled only with the `python`
//! feature (maturin turns it on; `cargo test` leaves it off).

pub mod pretokenize;
pub mod tokenizer;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use pretokenize::{Splitter, GPT4_PATTERN};
pub use tokenizer::{Tokenizer, TokenizerError};
pub use train::{ChunkCounter, Pair};
