"""The rustbpe extension against a slow pure-Python BPE and against tiktoken (STYLE rule 9).

Run: .venv/bin/python -m pytest tests/test_rustbpe.py -q
Hermetic: the corpus is built from fixed strings and the docstrings of standard-library modules.
"""

import collections
import json
import logging
import pickle
import textwrap

import pytest
import regex
import tiktoken

import rustbpe

# Default pattern of rustbpe (GPT-4 / cl100k, digits in groups of up to 3) and nanochat's variant.
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
NANOCHAT_PATTERN = GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")

TRICKY = [
    "Hello world! How are you? 🙃",
    "it's we'LL they're I'd you've SHE'S 'tis ''quoted''",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10 ١٢٣٤",
    "  leading and   multiple   spaces\t\ttabs \n\n\nnew  \r\n lines   ",
    "naïve café résumé Ünïcödé 你好世界 こんにちは 🙂👍🏽 Ω≈ç√",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "!!! ... ??? --- ;;; ((( ))) {{}} [[]] <<>> @@ ## $$ %% ^^ && **",
]


def _corpus():
    """~40k characters of real prose and code-ish text, identical on every run of one installation."""
    import argparse
    import difflib
    import heapq
    import inspect

    docs = [inspect.getdoc(m) or "" for m in (argparse, collections, difflib, heapq, json, textwrap, logging)]
    docs += [inspect.getdoc(f) or "" for f in (textwrap.wrap, json.dumps, collections.Counter, difflib.SequenceMatcher)]
    return [d for d in docs if d] + TRICKY * 3


CORPUS = _corpus()


# -----------------------------------------------------------------------------
# Slow reference: minbpe-style training that recounts every pair at every step.

def reference_train(texts, vocab_size, pattern=GPT4_PATTERN):
    """Return the merges [(a, b), ...] (merge k creates id 256 + k). Ties on count go to the smaller pair."""
    chunk_counts = collections.Counter(c for t in texts for c in regex.findall(pattern, t))
    words = [[list(c.encode("utf-8")), n] for c, n in chunk_counts.items()]
    merges = []
    while len(merges) < vocab_size - 256:
        stats = collections.Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                stats[pair] += n
        if not stats:
            break
        best = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        new_id = 256 + len(merges)
        for w in words:
            w[0] = _merge(w[0], best, new_id)
        merges.append(best)
    return merges


def _merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_encode(text, merges, pattern=GPT4_PATTERN):
    """Per chunk, repeatedly apply the mergeable pair with the lowest merged id."""
    rank = {pair: 256 + k for k, pair in enumerate(merges)}
    out = []
    for chunk in regex.findall(pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            ids = _merge(ids, pair, rank[pair])
        out.extend(ids)
    return out


def reference_ranks(merges):
    token_bytes = [bytes([i]) for i in range(256)]
    for a, b in merges:
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return [(b, i) for i, b in enumerate(token_bytes)]


def trained(texts=CORPUS, vocab_size=256 + 60, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(texts, vocab_size, **kwargs)
    return tok


def to_tiktoken(tok):
    ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
    return tiktoken.Encoding(name="rustbpe", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={})


# -----------------------------------------------------------------------------
# Parity with the references

@pytest.fixture(scope="module")
def reference_merges():
    return reference_train(CORPUS, 256 + 60)


def test_merges_and_ids_match_python_reference(reference_merges):
    tok = trained()
    assert len(reference_merges) == 60
    assert tok.get_mergeable_ranks() == reference_ranks(reference_merges)
    for text in TRICKY + CORPUS[:3]:
        assert tok.encode(text) == reference_encode(text, reference_merges)


def test_nanochat_pattern_matches_python_reference():
    texts = TRICKY * 4
    tok = trained(texts, 256 + 30, pattern=NANOCHAT_PATTERN)
    assert tok.get_pattern() == NANOCHAT_PATTERN
    assert tok.get_mergeable_ranks() == reference_ranks(reference_train(texts, 256 + 30, NANOCHAT_PATTERN))


def test_worked_example_tie_break():
    # At count 3, (h,e), (e,l), (l,l), (l,o) tie and the smallest pair (e,l) wins.
    tok = trained(["hello hello hello world world"], 260)
    assert [b for b, _ in tok.get_mergeable_ranks()[256:]] == [b"el", b"hel", b"lo", b"hello"]
    assert tok.encode("hello world") == [259, 32, 119, 111, 114, 108, 100]


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, NANOCHAT_PATTERN])
def test_ids_match_tiktoken(pattern):
    tok = trained(vocab_size=256 + 200, pattern=pattern)
    enc = to_tiktoken(tok)
    for text in TRICKY + CORPUS:
        assert enc.encode_ordinary(text) == tok.encode(text)


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, NANOCHAT_PATTERN])
def test_fast_pretokenizer_equals_fancy_regex(pattern):
    # Wrapping the pattern in a group changes nothing about what it matches but makes rustbpe run
    # fancy-regex instead of its hand-written matcher for the GPT-4 pattern family.
    fast = trained(vocab_size=256 + 150, pattern=pattern)
    slow = trained(vocab_size=256 + 150, pattern=f"(?:{pattern})")
    assert fast.get_mergeable_ranks() == slow.get_mergeable_ranks()
    for text in TRICKY + CORPUS:
        assert fast.encode(text) == slow.encode(text)


def test_default_pattern_is_gpt4():
    assert trained(["abc abc"], 257).get_pattern() == GPT4_PATTERN


def test_result_independent_of_buffer_size_and_input_kind():
    want = trained().get_mergeable_ranks()
    assert trained(iter(CORPUS), buffer_size=1).get_mergeable_ranks() == want
    assert trained((t for t in CORPUS), buffer_size=7).get_mergeable_ranks() == want
    assert trained(tuple(CORPUS), buffer_size=100_000).get_mergeable_ranks() == want


# -----------------------------------------------------------------------------
# API behaviour

def test_fresh_tokenizer():
    tok = rustbpe.Tokenizer()
    assert tok.vocab_size == 256
    assert tok.get_pattern() == ""
    assert tok.get_mergeable_ranks() == [(bytes([i]), i) for i in range(256)]
    assert tok.encode("anything") == []
    assert tok.decode([104, 105]) == "hi"


def test_vocab_size_and_early_stop():
    assert trained(["hello hello hello", "world world world"], 260).vocab_size == 260
    # "ab" has exactly one pair: training stops after one merge instead of failing.
    tok = trained(["ab"], 1000)
    assert tok.vocab_size == 257
    assert tok.get_mergeable_ranks()[-1] == (b"ab", 256)
    assert trained(["ab"], 2**32 - 1).vocab_size == 257  # nothing is reserved for the requested size
    with pytest.raises(ValueError, match="vocab_size must be at most"):
        trained(["ab"], 2**32)


def test_retraining_replaces_previous_merges():
    tok = trained(["aaaa bbbb"], 258)
    tok.train_from_iterator(["xyxyxy"], 257, pattern=r"\w+")
    assert tok.get_pattern() == r"\w+"
    assert tok.get_mergeable_ranks()[256:] == [(b"xy", 256)]


def test_batch_encode_equals_encode():
    tok = trained(vocab_size=512)
    texts = ["Hello world", "The quick brown fox", "jumps over the lazy dog", "", "a"] + TRICKY
    assert tok.batch_encode(texts) == [tok.encode(t) for t in texts]
    assert tok.batch_encode([]) == []


def test_decode_roundtrip():
    tok = trained(vocab_size=512)
    for text in ["", "   spaces   ", "hello world", "\n\n", *TRICKY, CORPUS[0]]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_errors():
    tok = trained(vocab_size=300)
    with pytest.raises(ValueError, match="Unknown token id: 300"):
        tok.decode([1, 300])
    with pytest.raises(ValueError, match="Unknown token id: -1"):
        tok.decode([-1])
    # 0xC3 starts a 2-byte sequence; alone it is not UTF-8.
    with pytest.raises(UnicodeDecodeError) as info:
        tok.decode([104, 0xC3])
    assert info.value.start == 1 and info.value.encoding == "utf-8"


@pytest.mark.parametrize("vocab_size", [255, 0, -5])
def test_vocab_size_too_small(vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size must be at least 256.*got {vocab_size}"):
        rustbpe.Tokenizer().train_from_iterator(["abc"], vocab_size)


def test_bad_arguments_raise_clear_errors():
    tok = rustbpe.Tokenizer()
    with pytest.raises(ValueError, match="Invalid regex pattern"):
        tok.train_from_iterator(["abc"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="buffer_size must be at least 1"):
        tok.train_from_iterator(["abc"], 300, buffer_size=0)
    with pytest.raises(TypeError, match="item 1 of the iterator is int, expected str"):
        tok.train_from_iterator(["abc", 3], 300)
    with pytest.raises(TypeError, match="item 0 of the iterator is bytes"):
        tok.train_from_iterator([b"abc"], 300)
    with pytest.raises(TypeError, match="expects an iterable of str, got int"):
        tok.train_from_iterator(42, 300)
    # A failed call leaves the tokenizer as it was.
    assert tok.vocab_size == 256 and tok.get_pattern() == ""


def test_iterator_exception_propagates():
    class Boom(RuntimeError):
        pass

    def texts():
        yield "hello world"
        raise Boom("corpus reader failed")

    with pytest.raises(Boom, match="corpus reader failed"):
        rustbpe.Tokenizer().train_from_iterator(texts(), 300)


def test_progress_goes_to_python_logging(caplog):
    with caplog.at_level(logging.INFO, logger="rustbpe"):
        trained(["hello hello world"], 258)
    messages = [r.getMessage() for r in caplog.records if r.name == "rustbpe"]
    assert any("Processed 1 sequences total" in m for m in messages), messages
    assert any("Finished training: 2 merges completed" in m for m in messages), messages


def test_not_picklable():
    with pytest.raises(TypeError):
        pickle.dumps(rustbpe.Tokenizer())
