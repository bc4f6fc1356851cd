"""Tests of nanochat/engine.py: KV cache, sampling, streaming/batched generation, tool use, calculator.

Most tests use a mock model (its logits are chosen by the test) and a byte tokenizer:
ids 0-255 are bytes, 256 python_start, 257 python_end, 258 output_start, 259 output_end,
260 assistant_end, 261 bos. The parity tests run a tiny real GPT against cache-free recomputation.
"""

import functools
import json
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from bench import infer_bench
from bench.engine_check import compare_with_reference
from conftest import SmallVocabTokenizer
from nanochat import engine as engine_module
from nanochat.engine import Engine, KVCache, argmax_rows, last_logits, sample_next_token, use_calculator

VOCAB = 262
PYTHON_START, PYTHON_END, OUTPUT_START, OUTPUT_END, ASSISTANT_END, BOS = range(256, 262)
SPECIALS = {"<|python_start|>": PYTHON_START, "<|python_end|>": PYTHON_END, "<|output_start|>": OUTPUT_START,
            "<|output_end|>": OUTPUT_END, "<|assistant_end|>": ASSISTANT_END, "<|bos|>": BOS}


class ByteTokenizer:
    def encode_special(self, name):
        return SPECIALS[name]

    def get_bos_token_id(self):
        return BOS

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        names = {v: k for k, v in SPECIALS.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(names[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def _config(seq_len=256):
    return SimpleNamespace(sequence_len=seq_len, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


class MockModel:
    """Uniform (zero) logits over the vocabulary; advances the cache by T like the real model.

    `logits_fn(ids, pos)` may override: it gets the (B, T) input and the cache position before the
    call and returns (B, V) logits for the last position. Every call's input is recorded.
    """

    def __init__(self, seq_len=256, logits_fn=None):
        self.config = _config(seq_len)
        self.logits_fn = logits_fn
        self.calls = []

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        pos = 0 if kv_cache is None else kv_cache.get_pos()
        self.calls.append(ids.tolist())
        logits = torch.zeros(B, T, VOCAB)
        if self.logits_fn is not None:
            logits[:, -1] = self.logits_fn(ids, pos)
        if kv_cache is not None:
            kv_cache.advance(T)
        return logits

    __call__ = forward


def one_hot(token, batch=1, value=100.0):
    logits = torch.zeros(batch, VOCAB)
    logits[:, token] = value
    return logits


def scripted(prompt_len, completion):
    """Greedy script: generated token k is completion[k] (so forced steps may hold anything)."""
    def logits_fn(ids, pos):
        k = pos + ids.size(1) - prompt_len
        return one_hot(completion[min(k, len(completion) - 1)], ids.size(0))
    return logits_fn


def make_engine(**kwargs):
    return Engine(MockModel(**kwargs), ByteTokenizer())


PROMPT = [BOS] + list(b"Hi there")


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# -----------------------------------------------------------------------------
# KV cache


def test_kv_cache_basic():
    cache = KVCache(batch_size=2, num_heads=3, seq_len=64, head_dim=8, num_layers=4, device="cpu", dtype=torch.float32)
    assert cache.get_pos() == 0
    assert cache.k_cache.shape == cache.v_cache.shape == (4, 2, 64, 3, 8)
    assert cache.cache_seqlens.dtype == torch.int32 and cache.prev_embedding is None
    cache.advance(10)
    cache.advance(5)
    assert cache.get_pos() == 15 and cache.cache_seqlens.tolist() == [15, 15]
    cache.prev_embedding = torch.ones(2, 1, 24)
    cache.reset()
    assert cache.get_pos() == 0 and cache.cache_seqlens.tolist() == [0, 0] and cache.prev_embedding is None
    k, v = cache.get_layer_cache(1)
    assert k.shape == v.shape == (2, 64, 3, 8)
    k[0, 0, 0, 0] = 7.0  # a view: writes land in the cache
    assert cache.k_cache[1, 0, 0, 0, 0] == 7.0


def test_kv_cache_default_dtype_is_compute_dtype():
    from nanochat.common import get_compute_dtype

    cache = KVCache(1, 1, 4, 2, 1, device="cpu")
    assert cache.k_cache.dtype == get_compute_dtype()[0]


def test_kv_cache_overflow_is_loud():
    cache = KVCache(1, 1, 8, 2, 1, device="cpu", dtype=torch.float32)
    cache.advance(8)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.advance(1)


def test_kv_cache_prefill():
    src = KVCache(batch_size=1, num_heads=2, seq_len=32, head_dim=4, num_layers=3, device="cpu", dtype=torch.float32)
    src.k_cache.normal_()
    src.v_cache.normal_()
    src.advance(16)
    src.prev_embedding = torch.randn(1, 1, 12)
    dst = KVCache(batch_size=5, num_heads=2, seq_len=64, head_dim=4, num_layers=3, device="cpu", dtype=torch.float32)
    dst.prefill(src)
    assert dst.get_pos() == 16 and dst.cache_seqlens.tolist() == [16] * 5
    for row in range(5):
        assert torch.equal(dst.k_cache[:, row, :16], src.k_cache[:, 0, :16])
        assert torch.equal(dst.v_cache[:, row, :16], src.v_cache[:, 0, :16])
    assert dst.k_cache[:, :, 16:].abs().sum() == 0  # nothing past the copied positions
    assert dst.prev_embedding.shape == (5, 1, 12)
    assert torch.equal(dst.prev_embedding[3], src.prev_embedding[0])
    dst.prev_embedding[0] += 1  # a copy, not a view of the source
    assert not torch.equal(dst.prev_embedding[0], src.prev_embedding[0])


def test_kv_cache_prefill_rejects_mismatches():
    src = KVCache(1, 2, 32, 4, 3, device="cpu", dtype=torch.float32)
    src.advance(20)
    with pytest.raises(ValueError, match="layers, heads, head_dim"):
        KVCache(2, 2, 64, 8, 3, device="cpu", dtype=torch.float32).prefill(src)
    with pytest.raises(ValueError, match="capacity"):
        KVCache(2, 2, 16, 4, 3, device="cpu", dtype=torch.float32).prefill(src)
    used = KVCache(2, 2, 64, 4, 3, device="cpu", dtype=torch.float32)
    used.advance(1)
    with pytest.raises(RuntimeError, match="empty cache"):
        used.prefill(src)


def test_kv_cache_keep_rows():
    cache = KVCache(4, 1, 8, 2, 2, device="cpu", dtype=torch.float32)
    for row in range(4):
        cache.k_cache[:, row] = row
        cache.v_cache[:, row] = 10 + row
    cache.prev_embedding = torch.arange(4.0).view(4, 1, 1)
    cache.advance(3)
    cache.keep_rows([1, 3])
    assert cache.batch_size == 2 and cache.k_cache.shape == (2, 2, 8, 1, 2) and cache.cache_seqlens.tolist() == [3, 3]
    # Only the 3 filled positions are carried over (the rest is never read before being written).
    assert cache.k_cache[:, 0, :3].unique().tolist() == [1.0] and cache.v_cache[:, 1, :3].unique().tolist() == [13.0]
    assert cache.prev_embedding.flatten().tolist() == [1.0, 3.0]
    assert cache.get_pos() == 3


# -----------------------------------------------------------------------------
# Sampling


def test_sample_greedy_and_top_k():
    rng = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next_token(logits, rng, temperature=0.0, top_k=3).tolist() == [[1], [0]]
    assert sample_next_token(logits, rng, temperature=1.0, top_k=1).tolist() == [[1], [0]]
    # top_k=2 on the first row may only ever give tokens 1 or 3.
    draws = {int(sample_next_token(logits[:1], rng, temperature=5.0, top_k=2)) for _ in range(200)}
    assert draws == {1, 3}
    full = {int(sample_next_token(logits[:1], rng, temperature=50.0, top_k=None)) for _ in range(200)}
    assert full == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, rng, temperature=-0.1)


@pytest.mark.parametrize("top_k,top_p", [(None, 1.0), (50, 1.0), (None, 0.9)])
def test_batched_sampling_draws_what_multinomial_draws_per_block(top_k, top_p):
    # Each block of rows, drawn with its own generator in one batched call, gets the tokens torch.multinomial gives
    # it alone: a seeded request samples the same whether or not others share its batch.
    from nanochat.engine import top_p_filter
    blocks, V = [2, 1, 4, 1], 320
    logits = 3 * torch.randn(sum(blocks), V, generator=torch.Generator().manual_seed(7))
    mine = [torch.Generator().manual_seed(s) for s in range(len(blocks))]
    ref = [torch.Generator().manual_seed(s) for s in range(len(blocks))]
    for _ in range(5):
        out, expected, start = sample_next_token(logits, list(zip(mine, blocks)), 0.8, top_k, top_p), [], 0
        for g, n in zip(ref, blocks):
            rows, start = top_p_filter(logits[start:start + n], top_p, 0.8), start + n
            values, index = torch.topk(rows, top_k, dim=-1) if top_k else (rows, None)
            choice = torch.multinomial(torch.softmax(values / 0.8, dim=-1), 1, generator=g)
            expected.append(choice if index is None else index.gather(-1, choice))
        assert torch.equal(out, torch.cat(expected))
    with pytest.raises(RuntimeError, match="NaN or inf"):
        sample_next_token(torch.full((1, V), float("nan")), mine[0], 1.0)


# -----------------------------------------------------------------------------
# Generation (the eight upstream test_engine items, then ours)


def test_multi_sample_first_token_diversity():
    engine = make_engine()
    rows, _ = engine.generate_batch(PROMPT, num_samples=16, max_tokens=1, temperature=1.0, seed=42)
    first = [row[len(PROMPT)] for row in rows if len(row) > len(PROMPT)]
    assert len(set(first)) > 1, "every sample drew the same first token: logits were not expanded per row"


@pytest.mark.parametrize("seed", [1, 42, 123, 999])
def test_seed_reproducibility(seed):
    engine = make_engine()
    outs = [engine.generate_batch(PROMPT, num_samples=4, max_tokens=5, temperature=1.0, seed=seed) for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]


def test_temperature_zero_determinism():
    engine = make_engine()
    outs = [engine.generate_batch(PROMPT, num_samples=2, max_tokens=8, temperature=0.0, seed=s)[0] for s in (1, 42, 123)]
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("max_tokens", [1, 4, 16, 64])
def test_max_tokens_respected(max_tokens):
    engine = make_engine()
    rows, masks = engine.generate_batch(PROMPT, num_samples=3, max_tokens=max_tokens, temperature=1.0)
    for row, mask in zip(rows, masks):
        assert len(row) - len(PROMPT) <= max_tokens and len(mask) == len(row)
    columns = list(engine.generate(PROMPT, num_samples=3, max_tokens=max_tokens, temperature=1.0))
    assert len(columns) <= max_tokens


@pytest.mark.parametrize("num_samples", [1, 4, 16, 64])
def test_num_samples_count(num_samples):
    rows, masks = make_engine().generate_batch(PROMPT, num_samples=num_samples, max_tokens=3)
    assert len(rows) == len(masks) == num_samples
    for column, column_masks in make_engine().generate(PROMPT, num_samples=num_samples, max_tokens=3):
        assert len(column) == len(column_masks) == num_samples


def test_different_seeds_introduce_variation_when_temperature_nonzero():
    engine = make_engine()
    outs = {tuple(engine.generate_batch(PROMPT, max_tokens=6, temperature=1.0, seed=s)[0][0]) for s in range(10)}
    assert len(outs) > 1


def test_masks_and_prompt_prefix():
    rows, masks = make_engine().generate_batch(PROMPT, num_samples=2, max_tokens=4, temperature=1.0)
    for row, mask in zip(rows, masks):
        assert row[:len(PROMPT)] == PROMPT
        assert mask[:len(PROMPT)] == [0] * len(PROMPT)
        assert all(m == 1 for m in mask[len(PROMPT):])  # no tool call: every generated token was sampled


def test_bad_arguments_are_rejected():
    engine = make_engine()
    for tokens in ([], "abc", [1, "2"], [1.0, 2.0], None):
        with pytest.raises(ValueError, match="tokens"):
            next(engine.generate(tokens, max_tokens=1))
    with pytest.raises(ValueError, match="num_samples"):
        next(engine.generate(PROMPT, num_samples=0, max_tokens=1))
    with pytest.raises(ValueError, match="temperature"):
        next(engine.generate(PROMPT, max_tokens=1, temperature=-1.0))
    with pytest.raises(ValueError, match="max_tokens"):
        next(engine.generate(PROMPT, max_tokens=-1))


def test_stop_tokens_end_rows_and_finished_rows_leave_the_batch():
    # The first sampled token decides each row's fate: 'a' ends at once, 'b' runs three more steps
    # then hits <|bos|> (also a terminator), anything else is never sampled (-inf).
    def logits_fn(ids, pos):
        out = torch.full((ids.size(0), VOCAB), -float("inf"))
        for row, last in enumerate(ids[:, -1].tolist()):
            if pos == 0:
                out[row, [ord("a"), ord("b")]] = 0.0  # prefill: a coin flip per sample
            elif last == ord("a"):
                out[row, ASSISTANT_END] = 0.0
            elif last == ord("b") or last == ord("c"):
                out[row, ord("c") if pos < len(PROMPT) + 3 else BOS] = 0.0
        return out

    model = MockModel(logits_fn=logits_fn)
    engine = Engine(model, ByteTokenizer())
    columns = list(engine.generate(PROMPT, num_samples=8, max_tokens=50, temperature=1.0, seed=3))
    rows = list(zip(*[c for c, _ in columns]))
    masks = list(zip(*[m for _, m in columns]))
    kinds = {row[0] for row in rows}
    assert kinds == {ord("a"), ord("b")}, "seed 3 should give both kinds of rows"
    for row, mask in zip(rows, masks):
        if row[0] == ord("a"):
            assert row[1] == ASSISTANT_END and set(row[2:]) <= {ASSISTANT_END} and set(mask[2:]) <= {0}
        else:
            assert list(row[:5]) == [ord("b"), ord("c"), ord("c"), ord("c"), BOS]
    assert len(columns) == 5  # stops as soon as every row has ended
    # Forward passes: prefill, then one per column except the last (no wasted pass after the end);
    # the rows that ended with 'a' dropped out of the batch after step 2.
    n_b = sum(row[0] == ord("b") for row in rows)
    assert [len(call) for call in model.calls] == [1, 8, n_b, n_b, n_b]
    results, result_masks = engine.generate_batch(PROMPT, num_samples=8, max_tokens=50, temperature=1.0, seed=3)
    for result, row in zip(results, rows):
        expected = [ord("a")] if row[0] == ord("a") else [ord("b"), ord("c"), ord("c"), ord("c")]
        assert result == PROMPT + expected  # terminal token excluded
    assert all(len(r) == len(m) for r, m in zip(results, result_masks))


def test_tool_call_forces_calculator_output():
    tok = ByteTokenizer()
    completion = ([PYTHON_START] + tok.encode("3*6") + [PYTHON_END] + [0] * 4  # 4 steps overridden by the tool
                  + tok.encode(" #### 18") + [ASSISTANT_END])
    model = MockModel(logits_fn=scripted(len(PROMPT), completion))
    engine = Engine(model, tok)
    results, masks = engine.generate_batch(PROMPT, num_samples=2, max_tokens=40, temperature=0.0)
    generated = results[0][len(PROMPT):]
    expected = [PYTHON_START] + tok.encode("3*6") + [PYTHON_END, OUTPUT_START] + tok.encode("18") + [OUTPUT_END] + tok.encode(" #### 18")
    assert generated == expected and results[1] == results[0]
    assert tok.decode(generated) == "<|python_start|>3*6<|python_end|><|output_start|>18<|output_end|> #### 18"
    gen_mask = masks[0][len(PROMPT):]
    assert gen_mask == [1] * 5 + [0] * 4 + [1] * 8  # forced tool output is mask 0
    # The forced tokens were fed back through the model, like sampled ones.
    fed = [call[0][0] for call in model.calls[1:]]
    assert fed[5:9] == [OUTPUT_START] + tok.encode("18") + [OUTPUT_END]


def test_failed_tool_call_forces_nothing():
    tok = ByteTokenizer()
    completion = [PYTHON_START] + tok.encode("2**99") + [PYTHON_END] + tok.encode("ok") + [ASSISTANT_END]
    engine = Engine(MockModel(logits_fn=scripted(len(PROMPT), completion)), tok)
    results, masks = engine.generate_batch(PROMPT, max_tokens=40, temperature=0.0)
    assert results[0][len(PROMPT):] == completion[:-1]
    assert masks[0][len(PROMPT):] == [1] * (len(completion) - 1)


def test_python_end_outside_a_block_and_empty_block_force_nothing():
    tok = ByteTokenizer()
    completion = [PYTHON_END, PYTHON_START, PYTHON_END] + tok.encode("x") + [ASSISTANT_END]
    engine = Engine(MockModel(logits_fn=scripted(len(PROMPT), completion)), tok)
    results, masks = engine.generate_batch(PROMPT, max_tokens=40, temperature=0.0)
    assert results[0][len(PROMPT):] == completion[:-1] and all(m == 1 for m in masks[0][len(PROMPT):])


def test_max_tokens_none_fills_the_context_but_never_overflows():
    engine = make_engine(seq_len=32)
    prompt = [BOS] + [65] * 9
    rows, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=None, temperature=0.0)  # zero logits never stop
    assert all(len(row) == 32 for row in rows)
    with pytest.raises(ValueError, match="context"):
        next(make_engine(seq_len=8).generate([BOS] + [65] * 9))


def test_without_tokenizer_there_are_no_stops_or_tools():
    model = MockModel(logits_fn=lambda ids, pos: one_hot(ASSISTANT_END, ids.size(0)))
    rows, masks = Engine(model).generate_batch(PROMPT, num_samples=1, max_tokens=3, temperature=0.0)
    assert rows[0][len(PROMPT):] == [ASSISTANT_END] * 3


# -----------------------------------------------------------------------------
# Calculator


@pytest.mark.parametrize("expr, expected", [
    ("12/60", 0.2), ("0.2*50", 10.0), ("3*4", 12), ("1,000 * 3", 3000), ("(2+3)*4 - 1", 19), ("7//2", 3),
    ("-3 + -2", -5), ("'strawberry'.count('r')", 3), ('"banana".count("a")', 3), ("  5  ", 5),
])
def test_calculator_values(expr, expected):
    result = use_calculator(expr)
    assert result == expected and type(result) is type(expected)


def test_calculator_result_text_matches_python_str():
    assert [str(use_calculator(e)) for e in ("12/60", "0.2*50", "3*4")] == ["0.2", "10.0", "12"]


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "().__class__", "'a'.__class__", "'abc'.upper()", "'x'.count", "open('f')",
    "exec('1')", "eval('1')", "globals()", "dir()", "getattr('a', 'count')('a')", "abc.count(1)",
    "2**10", "9**9**9", "2 ** 3", "10 % 3", "1 if 1 else 2", "[1, 2]", "x", "lambda: 1", "(1)(2)", "1/0", "1.2.3",
    "'a' + 'b'", "'ab'.count('a').count('b')", "'abc'.count(1)", "'ab' 'c'.count()", "", "   ",
    "9" * 2000, "(" * 300 + "1" + ")" * 300,
])
def test_calculator_rejects(expr):
    assert use_calculator(expr) is None


def test_calculator_huge_result_is_rejected_not_printed():
    # 150 copies of a 5-digit factor: a 750-digit product is fine; str() of it works.
    assert len(str(use_calculator("*".join(["99999"] * 150)))) == 750
    # A 980-digit product is within Python's default int->str digit limit (4300); past the limit (640 below) the
    # result can't become text for the model: None.
    assert use_calculator("*".join(["9" * 98] * 10)) == (10 ** 98 - 1) ** 10
    import sys
    if hasattr(sys, "get_int_max_str_digits"):
        old = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(640)
        try:
            assert use_calculator("*".join(["9" * 98] * 10)) is None
        finally:
            sys.set_int_max_str_digits(old)


def test_calculator_timeout_works_off_the_main_thread(monkeypatch):
    monkeypatch.setattr(engine_module, "_evaluate_expression", lambda expr: time.sleep(3) or 1)
    box = []
    worker = threading.Thread(target=lambda: box.append((use_calculator("1+1", timeout=0.2), time.perf_counter())))
    t0 = time.perf_counter()
    worker.start()
    worker.join()
    result, finished = box[0]
    assert result is None and finished - t0 < 2.0


def test_calculator_in_a_thread_gives_results():
    box = []
    worker = threading.Thread(target=lambda: box.append(use_calculator("6*7")))
    worker.start()
    worker.join()
    assert box == [42]


def test_calculator_never_calls_eval(monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec must not be used")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert use_calculator("2*21") == 42 and use_calculator("'aaa'.count('a')") == 3


# -----------------------------------------------------------------------------
# The self-check on the mock model


def test_compare_with_reference_reports_a_mismatch_on_mock():
    """The self-check can fail: the engine follows the script, a reference that differs is no match."""
    completion = list(b"hello world")
    model = MockModel(logits_fn=scripted(len(PROMPT), completion))
    model.generate = lambda tokens, max_tokens, temperature: iter(list(b"jello world")[:max_tokens])
    result = compare_with_reference(model, PROMPT, max_tokens=8)
    assert result["engine"] == completion[:8] and result["reference"] == list(b"jello wo")
    assert not result["match"]


# -----------------------------------------------------------------------------
# A tiny real GPT: the cached engine against cache-free recomputation


@pytest.fixture
def scrambled_gpt(tiny_gpt):
    """The parity tests' model: 3 layers, GQA (4 query heads, 2 kv heads), weights scrambled so that
    logits are far from ties and every feature (smear, value embeddings, backout, GQA) shapes them."""
    return functools.partial(tiny_gpt, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=2, scrambled=True)


def test_engine_greedy_matches_naive_recompute(scrambled_gpt):
    model = scrambled_gpt()
    prompt = [BOS] + list(b"The sky is")
    reference = list(model.generate(prompt, 30, temperature=0.0))
    rows, masks = Engine(model).generate_batch(prompt, num_samples=3, max_tokens=30, temperature=0.0)
    for row in rows:
        assert row[len(prompt):] == reference
    assert len(set(reference)) > 3, "the scrambled model should not be stuck on one token"


def test_engine_greedy_matches_naive_with_sliding_windows(scrambled_gpt):
    # sequence_len 512 -> short window 128: decoding from position ~110 to ~170 crosses it.
    model = scrambled_gpt(sequence_len=512, window_pattern="SL", seed=1)
    prompt = [BOS] + list(b"abcdefghij" * 11)
    reference = list(model.generate(prompt, 60, temperature=0.0))
    rows, _ = Engine(model).generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert rows[0][len(prompt):] == reference


def test_compare_with_reference_reports_a_match(scrambled_gpt):
    model = scrambled_gpt(seed=2)
    result = compare_with_reference(model, [BOS] + list(b"hello"), max_tokens=12)
    assert result["match"] and len(result["engine"]) == 12
    assert result["reference_seconds"] > 0 and result["engine_seconds"] > 0


class RecordingModel:
    """Passes through to the model and keeps the last-position logits of every forward call."""

    def __init__(self, model):
        self.model, self.config, self.compute_dtype = model, model.config, model.compute_dtype
        self.logits = []

    def get_device(self):
        return self.model.get_device()

    def forward(self, ids, kv_cache=None):
        out = self.model.forward(ids, kv_cache=kv_cache)
        self.logits.append(out[:, -1].clone())
        return out


def test_sampled_rows_see_the_same_logits_as_recompute_while_rows_drop_out(scrambled_gpt):
    """Every logit row the engine sampled from equals a cache-free forward over that sample's own
    prefix, including after finished rows were removed from the cache (keep_rows)."""
    model = scrambled_gpt(vocab_size=16, seed=3)
    recorder = RecordingModel(model)
    engine = Engine(recorder, SmallVocabTokenizer())
    prompt = [6, 1, 2, 3, 4, 7, 8]
    columns = [c for c, _ in engine.generate(prompt, num_samples=6, max_tokens=25, temperature=1.0, seed=11)]
    samples = [list(row) for row in zip(*columns)]
    ended = [next((t for t, tok in enumerate(row) if tok in (5, 6)), None) for row in samples]
    assert len({e for e in ended if e is not None}) >= 2, "seed 11 should end rows at different steps"
    assert len(recorder.logits) == len(columns)  # prefill + one forward per column but the last
    with torch.no_grad():
        naive = model.forward(torch.tensor([prompt]))[0, -1]
    assert torch.allclose(recorder.logits[0][0], naive, atol=1e-4)
    for step in range(1, len(columns)):
        active = [s for s in range(6) if ended[s] is None or ended[s] >= step]
        assert recorder.logits[step].shape[0] == len(active)
        for row, s in enumerate(active):
            with torch.no_grad():
                naive = model.forward(torch.tensor([prompt + samples[s][:step]]))[0, -1]
            assert torch.allclose(recorder.logits[step][row], naive, atol=1e-4), (step, s)


def test_self_check_cli_on_a_saved_checkpoint(base_dir, byte_tokenizer, scrambled_gpt, monkeypatch):
    """`python -m bench.engine_check`: load a checkpoint, generate both ways, exit 0 when they match."""
    from dataclasses import asdict

    from bench import engine_check as cli
    from nanochat.checkpoint_manager import get_checkpoints_dir, save_checkpoint
    from nanochat.common import get_compute_dtype

    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")  # exact parity needs fp32 (bf16 rounding differs by path)
    get_compute_dtype.cache_clear()
    try:
        byte_tokenizer.save(str(base_dir / "tokenizer"))
        model = scrambled_gpt(vocab_size=byte_tokenizer.get_vocab_size(), seed=4)
        save_checkpoint(os.path.join(get_checkpoints_dir("base"), "d3"), 1, model.state_dict(), None,
                        {"step": 1, "model_config": asdict(model.config)})
        assert cli.main(["-i", "base", "-n", "10", "-p", "Water is", "--device-type", "cpu"]) == 0
        with pytest.raises(SystemExit, match="max-tokens"):
            cli.main(["-n", "0"])
    finally:
        get_compute_dtype.cache_clear()


@pytest.mark.gpu
def test_engine_on_cuda_fp32_and_bf16(scrambled_gpt):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    prompt = [BOS] + list(b"The sky is")
    model = scrambled_gpt(device="cuda")
    reference = list(model.generate(prompt, 30, temperature=0.0))
    rows, _ = Engine(model).generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    assert all(row[len(prompt):] == reference for row in rows)
    _assert_bf16_cache_matches_recompute(scrambled_gpt, "cuda")  # Flash-Attention-3 when installed


def test_engine_bf16_cache_on_cpu(scrambled_gpt):
    _assert_bf16_cache_matches_recompute(scrambled_gpt, "cpu")


def _assert_bf16_cache_matches_recompute(scrambled_gpt, device):
    """bf16: the cache is kept in bf16, and the logits each step was sampled from stay within bf16 rounding of a
    cache-free recompute of the same prefix (logits up to ~8 here; on CPU the worst gap measured 0.075, and
    decoding one rotary position off gives 1.3)."""
    prompt = [BOS] + list(b"The sky is")
    model16 = scrambled_gpt(device=device, compute_dtype=torch.bfloat16)
    recorder = RecordingModel(model16)
    engine = Engine(recorder)
    assert engine.kv_dtype == torch.bfloat16
    columns = [c for c, _ in engine.generate(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=5)]
    assert len(columns) == 20
    for step in range(len(columns)):
        for row in range(3):
            prefix = prompt + [c[row] for c in columns[:step]]
            with torch.no_grad():
                naive = model16.forward(torch.tensor([prefix], device=device))[0, -1]
            assert torch.allclose(recorder.logits[step][0 if step == 0 else row], naive, atol=0.25), (step, row)


# -----------------------------------------------------------------------------
# The Engine's fast paths against their references


def test_argmax_rows_is_torch_argmax_with_ties_and_nan():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1024, generator=gen)
    logits[1, 300] = logits[1, 700] = 10.0  # a tie across chunks: the first index wins
    logits[2, 5] = logits[2, 6] = 10.0  # a tie inside one chunk
    logits[3] = 0.0  # a whole row tied
    logits[4, 900] = logits[4, 950] = float("nan")  # NaN counts as the maximum
    logits[5] = float("-inf")
    expected = torch.argmax(logits, dim=-1, keepdim=True)
    assert expected[:4, 0].tolist() == [expected[0, 0].item(), 300, 5, 0]
    assert torch.equal(argmax_rows(logits), expected)
    # The first sample of every row reads one expanded logits row; widths that are no multiple of the
    # chunk take torch.argmax itself.
    assert torch.equal(argmax_rows(logits[:1].expand(4, -1)), expected[:1].expand(4, -1))
    odd = torch.randn(3, 265, generator=gen)
    assert torch.equal(argmax_rows(odd), torch.argmax(odd, dim=-1, keepdim=True))
    assert torch.equal(sample_next_token(logits, None, temperature=0.0), expected)


def test_prefill_runs_the_head_on_the_last_position_only(scrambled_gpt):
    model = scrambled_gpt(seed=5)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    ids = torch.tensor([[BOS] + list(b"a longer prompt")])
    cache = KVCache(1, 2, ids.size(1) + 1, 16, 3, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        got = last_logits(model, ids, cache)
        hook.remove()
        expected = model.forward(ids)[:, -1]
    assert rows == [torch.Size([1, 64])] and cache.get_pos() == ids.size(1)
    assert got.shape == (1, VOCAB) and torch.allclose(got, expected, atol=1e-5)


def test_engine_greedy_matches_naive_recompute_with_a_wide_vocab(scrambled_gpt):
    """512 tokens: greedy sampling goes through the chunked argmax, and still equals GPT.generate."""
    model = scrambled_gpt(vocab_size=512, seed=6)
    prompt = [BOS] + list(b"Once upon a time")
    reference = list(model.generate(prompt, 24, temperature=0.0))
    rows, _ = Engine(model).generate_batch(prompt, num_samples=2, max_tokens=24, temperature=0.0)
    assert all(row[len(prompt):] == reference for row in rows)
    assert len(set(reference)) > 3


# -----------------------------------------------------------------------------
# bench/infer_bench.py


def test_infer_bench_random_init_end_to_end(capsys):
    result = infer_bench.main(["--random-init", "--depth", "1", "--max-seq-len", "64", "--prompt-tokens", "16",
                               "--decode-tokens", "6", "--batch-sizes", "8,1", "--repeats", "2", "--warmup-tokens", "2",
                               "--device-type", "cpu", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(out[-1])
    assert printed["sweep"] == result["sweep"] and printed["source"] == "random-init"
    report = "\n".join(out[:-1])
    assert "TTFT ms" in report and "eng/fwd" in report and "targets:" in report
    assert result["model_config"]["n_layer"] == 1 and result["prompt_tokens"] == 16
    assert [row["batch_size"] for row in result["sweep"]] == [1, 8]
    for row in result["sweep"]:
        assert row["decode_steps"] == 5 and not row["early_stop"]  # 6 tokens: the first comes with the prefill
        assert 0 < row["forward_sec"] < 1 and 0 < row["tpot_sec"] < 1 and 0 < row["ttft_sec"] < 5
        assert row["tok_per_sec"] == pytest.approx(row["batch_size"] / row["tpot_sec"], rel=1e-3)
        assert row["mbu_percent"] is None and row["peak_vram_bytes"] is None  # CPU: no peak bandwidth, no VRAM
        assert 0 < row["mfu_percent"] < 100
        assert row["bytes_per_step"] == result["streamed_weight_bytes"] + row["batch_size"] * result["kv_read_bytes_per_step"]
    assert result["prefill"]["tok_per_sec"] > 0 and result["peak_flops_per_sec"] > 0
    assert result["kv_read_bytes_per_step"] == 1 * 2 * 1 * 128 * 4 * (16 + 6 // 2)  # layers * k,v * heads * dim * fp32 * ctx
    targets = result["targets"]
    assert set(targets) == {"engine_over_forward_bs1", "tok_per_sec_bs8_over_bs1"}
    assert all(isinstance(t["passed"], bool) and t["value"] > 0 for t in targets.values())
    assert report.count("[PASS]") + report.count("[FAIL]") == 2


def test_infer_bench_on_a_saved_checkpoint(base_dir, byte_tokenizer, scrambled_gpt, capsys):
    from dataclasses import asdict

    from nanochat.checkpoint_manager import get_checkpoints_dir, save_checkpoint

    byte_tokenizer.save(str(base_dir / "tokenizer"))
    model = scrambled_gpt(vocab_size=byte_tokenizer.get_vocab_size(), seed=7)
    save_checkpoint(os.path.join(get_checkpoints_dir("base"), "d3"), 1, model.state_dict(), None,
                    {"step": 1, "model_config": asdict(model.config)})
    result = infer_bench.main(["-i", "base", "--prompt-tokens", "100", "--decode-tokens", "4", "--batch-sizes", "2",
                               "--repeats", "1", "--device-type", "cpu"])
    assert result["source"] == "base" and result["step"] == 1 and result["model_config"]["n_layer"] == 3
    assert result["prompt_tokens"] == 60  # clamped: 64-token context minus 4 generated
    assert result["targets"] == {} and "targets:" not in capsys.readouterr().out
    assert all(row["batch_size"] == 2 and row["decode_steps"] <= 3 for row in result["sweep"])


def test_infer_bench_flag_errors_are_one_line():
    with pytest.raises(SystemExit, match="infer_bench: error: --decode-tokens must be >= 2"):
        infer_bench.main(["--random-init", "--decode-tokens", "1", "--device-type", "cpu"])
    with pytest.raises(SystemExit, match="vocab-size 100 is smaller"):
        infer_bench.main(["--random-init", "--depth", "1", "--vocab-size", "100", "--device-type", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        infer_bench.build_parser().parse_args(["--batch-sizes", "1,0"])
    assert exit_info.value.code == 2
