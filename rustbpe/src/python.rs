//! The Python module `rustbpe`: a thin PyO3 layer over [`crate::Tokenizer`].
//!
//! It owns what only Python can do: pulling texts from a Python iterator (under the GIL, in
//! batches of `buffer_size`), turning Rust errors into Python exceptions, and forwarding the
//! crate's `log` records to Python's `logging` (logger "rustbpe"). All heavy work runs with the
//! GIL released.

use pyo3::exceptions::{PyTypeError, PyUnicodeDecodeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::tokenizer::{Tokenizer, TokenizerError};

fn value_error(e: TokenizerError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Byte-level BPE tokenizer: train with `train_from_iterator`, export with `get_mergeable_ranks`.
#[pyclass(name = "Tokenizer", module = "rustbpe")]
pub struct PyTokenizer {
    inner: Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    /// An untrained tokenizer (empty pattern, no merges).
    #[new]
    fn new() -> Self {
        PyTokenizer {
            inner: Tokenizer::new(),
        }
    }

    /// Train on an iterable of str, learning `vocab_size - 256` merges. `pattern` defaults to the
    /// GPT-4 split pattern. Replaces any previous training; on error the tokenizer is unchanged.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None))]
    #[pyo3(text_signature = "(self, iterator, vocab_size, buffer_size=8192, pattern=None)")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<&str>,
    ) -> PyResult<()> {
        // Validate everything before consuming a single item of the caller's iterator.
        Tokenizer::merges_for_vocab_size(vocab_size).map_err(value_error)?;
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!(
                "buffer_size must be at least 1, got {buffer_size}"
            )));
        }
        let (pattern, mut counter) = Tokenizer::chunk_counter(pattern).map_err(value_error)?;
        let mut items = iterator.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator expects an iterable of str, got {}",
                type_name(iterator)
            ))
        })?;

        let buffer_size = buffer_size as usize;
        let mut buf: Vec<String> = Vec::with_capacity(buffer_size.min(1 << 16));
        let mut index: u64 = 0;
        let mut exhausted = false;
        while !exhausted {
            buf.clear();
            while buf.len() < buffer_size {
                let Some(item) = items.next() else {
                    exhausted = true;
                    break;
                };
                // An exception raised inside the iterator propagates as is.
                let item = item?;
                let text = item.cast::<PyString>().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "train_from_iterator: item {index} of the iterator is {}, expected str",
                        type_name(&item)
                    ))
                })?;
                buf.push(text.to_str()?.to_owned());
                index += 1;
            }
            py.detach(|| counter.add_texts(&buf));
        }
        drop(buf);
        let inner = &mut self.inner;
        py.detach(|| inner.train_from_counts(&pattern, counter, vocab_size))
            .map_err(value_error)
    }

    /// The split pattern ("" before training).
    fn get_pattern(&self) -> &str {
        self.inner.pattern()
    }

    /// `[(token_bytes, id), ...]` for all tokens in id order: 256 single bytes, then one per merge.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        (0..self.inner.vocab_size() as u32)
            .map(|id| {
                let bytes = self
                    .inner
                    .token_bytes(id)
                    .expect("ids below vocab_size exist");
                (PyBytes::new(py, bytes), id)
            })
            .collect()
    }

    /// Token ids of `text` (empty for an untrained tokenizer).
    fn encode(&self, py: Python<'_>, text: &str) -> Vec<u32> {
        let inner = &self.inner;
        py.detach(|| inner.encode(text))
    }

    /// `[encode(t) for t in texts]`, computed in parallel with the GIL released.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> Vec<Vec<u32>> {
        let inner = &self.inner;
        py.detach(|| inner.batch_encode(&texts))
    }

    /// The text of `ids`; ValueError on an unknown id, UnicodeDecodeError if the bytes are not UTF-8.
    fn decode(&self, py: Python<'_>, ids: Vec<i64>) -> PyResult<String> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for id in ids {
            let bytes = u32::try_from(id)
                .ok()
                .and_then(|i| self.inner.token_bytes(i))
                .ok_or_else(|| PyValueError::new_err(format!("Unknown token id: {id}")))?;
            out.extend_from_slice(bytes);
        }
        String::from_utf8(out)
            .map_err(|e| PyUnicodeDecodeError::new_err_from_utf8(py, e.as_bytes(), e.utf8_error()))
    }

    /// 256 + number of merges.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn __repr__(&self) -> String {
        format!(
            "rustbpe.Tokenizer(vocab_size={}, pattern={:?})",
            self.inner.vocab_size(),
            self.inner.pattern()
        )
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "an object of unknown type".to_string())
}

/// Fast byte-level BPE training (GPT-4 style regex pre-split) whose result tiktoken can encode with.
#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Forward `log` records to Python's logging. Loggers are cached, levels are not, so logging
    // configured after the import (as scripts do in main()) still takes effect.
    let logger =
        pyo3_log::Logger::new(m.py(), pyo3_log::Caching::Loggers)?.filter(log::LevelFilter::Info);
    if logger.install().is_err() {
        // Only one `log` backend can exist per process; another extension may have claimed it.
        // Training still works, its progress lines just do not reach Python.
        m.py().import("warnings")?.call_method1(
            "warn",
            ("rustbpe: a Rust logger is already installed; rustbpe progress will not be logged",),
        )?;
    }
    m.add_class::<PyTokenizer>()?;
    Ok(())
}
