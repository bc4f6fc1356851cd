"""Tests of nanochat/flash_attention.py: the SDPA fallback against naive masked attention (causal,
sliding windows, GQA, KV-cache prefill and decode with windows, gradients), the lazy FA3 loading and
the override switch, and, on a GPU with FA3, FA3 against SDPA.

    python -m pytest tests/test_attention_fallback.py -q            (CPU)
    python -m pytest tests/test_attention_fallback.py -q -m gpu     (FA3 vs SDPA, needs CUDA + FA3)
"""

import importlib.util
import logging
import math
import sys

import pytest
import torch

from nanochat import flash_attention as fa


def naive_attention(q, k, v, window):
    """Reference: explicit scores and mask in float64. q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D); the
    queries are the last Tq positions; key j is visible to query i iff j <= i and i - j <= window (w >= 0)."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    row = (Tk - Tq) + torch.arange(Tq).unsqueeze(1)
    col = torch.arange(Tk).unsqueeze(0)
    visible = col <= row
    if window >= 0:
        visible &= row - col <= window
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, Tq, H, D)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def sdpa_only():
    """Every CPU test runs the fallback; the override is restored afterwards."""
    saved = fa._override_impl
    fa.set_impl("sdpa")
    yield
    fa._override_impl = saved


def assert_close(a, b, atol=1e-5):
    diff = (a.double() - b.double()).abs()
    assert diff.max().item() <= atol, f"max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}"


# -----------------------------------------------------------------------------
# Fallback vs naive attention


@pytest.mark.parametrize("window", [-1, 64, 100])
def test_causal_full_context(window):
    q, k, v = rand(2, 64, 4, 32, seed=1), rand(2, 64, 4, 32, seed=2), rand(2, 64, 4, 32, seed=3)
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    assert out.shape == (2, 64, 4, 32)
    assert_close(out, naive_attention(q, k, v, -1))


@pytest.mark.parametrize("window", [0, 1, 8, 31])
def test_sliding_window(window):
    q, k, v = rand(2, 48, 2, 16, seed=4), rand(2, 48, 2, 16, seed=5), rand(2, 48, 2, 16, seed=6)
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    assert_close(out, naive_attention(q, k, v, window))
    assert (out - naive_attention(q, k, v, -1)).abs().max() > 1e-3, "the window must change the result"


@pytest.mark.parametrize("window", [-1, 8])
def test_gqa(window):
    q, k, v = rand(1, 40, 8, 16, seed=7), rand(1, 40, 2, 16, seed=8), rand(1, 40, 2, 16, seed=9)
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    assert out.shape == (1, 40, 8, 16)
    assert_close(out, naive_attention(q, k, v, window))


@pytest.mark.parametrize("window", [-1, 5])
def test_gradients_match_naive(window):
    q, k, v = (rand(2, 32, 4, 16, seed=s).requires_grad_() for s in (10, 11, 12))
    fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0)).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive_attention(q2, k2, v2, window).square().sum().backward()
    for g, ref in zip(grads, (q2.grad, k2.grad, v2.grad)):
        assert_close(g, ref, atol=1e-4)


def test_only_causal_is_supported():
    q = rand(1, 4, 1, 8)
    with pytest.raises(ValueError, match="causal"):
        fa.flash_attn_func(q, q, q, causal=False)


# -----------------------------------------------------------------------------
# KV cache


def filled_cache(batch, t_max, hkv, d, pos, seed):
    k_cache, v_cache = torch.zeros(batch, t_max, hkv, d), torch.zeros(batch, t_max, hkv, d)
    k_cache[:, :pos], v_cache[:, :pos] = rand(batch, pos, hkv, d, seed=seed), rand(batch, pos, hkv, d, seed=seed + 1)
    return k_cache, v_cache, torch.full((batch,), pos, dtype=torch.int32)


@pytest.mark.parametrize("cached,new,window,hkv", [
    (0, 16, -1, 4),  # prefill from empty
    (16, 1, 64, 4),  # one token after 16
    (32, 1, 8, 4),  # decode with a window shorter than the cache (upstream's Tq=1 window bug)
    (32, 1, 8, 2),  # the same with GQA
    (20, 6, 5, 2),  # a chunk appended to a non-empty cache, windowed
])
def test_kvcache_matches_naive_and_writes_in_place(cached, new, window, hkv):
    B, H, D, t_max = 2, 4, 16, 64
    k_cache, v_cache, seqlens = filled_cache(B, t_max, hkv, D, cached, seed=20)
    q, k, v = rand(B, new, H, D, seed=30), rand(B, new, hkv, D, seed=31), rand(B, new, hkv, D, seed=32)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True,
                                     window_size=(window, 0))
    assert out.shape == (B, new, H, D)
    assert torch.equal(k_cache[:, cached:cached + new], k) and torch.equal(v_cache[:, cached:cached + new], v)
    assert k_cache[:, cached + new:].abs().max() == 0  # nothing written past the new positions
    assert_close(out, naive_attention(q, k_cache[:, :cached + new], v_cache[:, :cached + new], window))
    # The host-side position hint gives the same answer without reading cache_seqlens.
    k2, v2, _ = filled_cache(B, t_max, hkv, D, cached, seed=20)
    out2 = fa.flash_attn_with_kvcache(q, k2, v2, k=k, v=v, cache_seqlens=None, causal=True, window_size=(window, 0),
                                      cache_pos=cached)
    assert_close(out2, out, atol=0)


def test_kvcache_decode_sequence_equals_full_attention():
    B, T, H, D, window = 1, 24, 2, 8, 6
    q, k, v = rand(B, T, H, D, seed=40), rand(B, T, H, D, seed=41), rand(B, T, H, D, seed=42)
    full = fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    k_cache, v_cache, seqlens = torch.zeros(B, T, H, D), torch.zeros(B, T, H, D), torch.zeros(B, dtype=torch.int32)
    outs = [fa.flash_attn_with_kvcache(q[:, :10], k_cache, v_cache, k=k[:, :10], v=v[:, :10], cache_seqlens=seqlens,
                                       causal=True, window_size=(window, 0))]
    seqlens += 10
    for t in range(10, T):
        outs.append(fa.flash_attn_with_kvcache(q[:, t:t + 1], k_cache, v_cache, k=k[:, t:t + 1], v=v[:, t:t + 1],
                                               cache_seqlens=seqlens, causal=True, window_size=(window, 0)))
        seqlens += 1
    assert_close(torch.cat(outs, dim=1), full)


def test_kvcache_overflow_is_a_clear_error():
    k_cache, v_cache, seqlens = filled_cache(1, 8, 1, 4, 7, seed=50)
    q = rand(1, 2, 1, 4)
    with pytest.raises(RuntimeError, match="overflow"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=q, v=q, cache_seqlens=seqlens, causal=True)


@pytest.mark.parametrize("lengths,new,window,hkv", [
    ([3, 17, 9], 1, -1, 4),  # decode, every row at its own position
    ([30, 41, 36], 1, 8, 2),  # windowed decode, GQA: keys cropped on the left, every row past the window
    ([0, 12, 5], 4, 6, 2),  # a 4-token chunk per row, one row from empty
    ([14, 7, 22], 3, -1, 1),  # chunks, multi-query
])
def test_kvcache_rows_at_different_positions_match_each_row_alone(lengths, new, window, hkv):
    B, H, D, t_max = len(lengths), 4, 16, 64
    k_cache = rand(B, t_max, hkv, D, seed=60)  # stale values past each row's length: they must stay unseen
    v_cache = rand(B, t_max, hkv, D, seed=61)
    q, k, v = rand(B, new, H, D, seed=62), rand(B, new, hkv, D, seed=63), rand(B, new, hkv, D, seed=64)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    for hint in (None, lengths):
        k_cache.copy_(before_k), v_cache.copy_(before_v)
        out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True,
                                         window_size=(window, 0), cache_pos=hint)
        for b, n in enumerate(lengths):
            assert torch.equal(k_cache[b, n:n + new], k[b]) and torch.equal(v_cache[b, n:n + new], v[b])
            assert torch.equal(k_cache[b, n + new:], before_k[b, n + new:])  # nothing written past the new ones
            expected = naive_attention(q[b:b + 1], k_cache[b:b + 1, :n + new], v_cache[b:b + 1, :n + new], window)
            assert_close(out[b:b + 1], expected)


# -----------------------------------------------------------------------------
# Loading and the override switch


def test_import_loads_nothing(monkeypatch):
    # Execute the module's top level afresh, with any FA3 probe booby-trapped.
    def boom():
        raise AssertionError("importing flash_attention probed CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    spec = importlib.util.spec_from_file_location("fresh_flash_attention", fa.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh._fa3_reason is None and fresh._fa3 is None


def test_fa3_load_reason_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(fa, "_fa3", None)
    monkeypatch.setattr(fa, "_fa3_reason", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="nanochat.flash_attention"):
        assert fa.has_fa3() is False
        assert fa.has_fa3() is False
        assert fa.fa3_status() == (False, "no CUDA device")
    records = [r for r in caplog.records if r.name == "nanochat.flash_attention"]
    assert len(records) == 1 and "no CUDA device" in records[0].getMessage()


def test_missing_kernels_package_falls_back(monkeypatch):
    monkeypatch.setattr(fa, "_fa3", None)
    monkeypatch.setattr(fa, "_fa3_reason", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "kernels", None)  # makes `import kernels` raise ImportError
    assert fa.has_fa3() is False
    assert "kernels" in fa.fa3_status()[1]


def test_override_mechanism():
    fa.set_impl("sdpa")
    assert fa.use_fa3(torch.bfloat16) is False and fa.USE_FA3 is False
    fa.set_impl(None)
    assert fa.use_fa3(torch.float32) is False  # FA3 never runs fp32
    assert fa.use_fa3(torch.bfloat16) == fa.HAS_FA3
    with pytest.raises(ValueError, match="sdpa"):
        fa.set_impl("flash")
    if not fa.has_fa3():
        with pytest.raises(RuntimeError, match="FA3"):
            fa.set_impl("fa3")


# -----------------------------------------------------------------------------
# FA3 vs SDPA (GPU with FA3 only)


def _needs_fa3():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not fa.has_fa3():
        pytest.skip(f"FA3 unavailable: {fa.fa3_status()[1]}")


def both_impls(fn):
    fa.set_impl("fa3")
    a = fn()
    fa.set_impl("sdpa")
    b = fn()
    return a, b


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,Hkv,D,window", [
    (2, 64, 4, 4, 32, 64), (2, 128, 4, 4, 32, -1), (2, 128, 4, 4, 32, 32), (2, 64, 8, 2, 32, 64), (4, 256, 12, 12, 64, -1),
])
def test_fa3_matches_sdpa(B, T, H, Hkv, D, window):
    _needs_fa3()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    a, b = both_impls(lambda: fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0)))
    assert_close(a, b, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("cached,new,window", [(0, 16, 64), (16, 1, 64), (32, 1, 8)])
def test_fa3_kvcache_matches_sdpa(cached, new, window):
    _needs_fa3()
    g = torch.Generator(device="cuda").manual_seed(1)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    base_k, base_v = torch.randn(2, 64, 4, 32, generator=g, **kw), torch.randn(2, 64, 4, 32, generator=g, **kw)
    base_k[:, cached:], base_v[:, cached:] = 0, 0
    q, k, v = (torch.randn(2, new, 4, 32, generator=g, **kw) for _ in range(3))

    def run():
        k_cache, v_cache = base_k.clone(), base_v.clone()
        seqlens = torch.full((2,), cached, dtype=torch.int32, device="cuda")
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True,
                                          window_size=(window, 0))

    a, b = both_impls(run)
    assert_close(a, b, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("new,window", [(1, -1), (1, 8), (3, 8)])
def test_fa3_kvcache_rows_at_different_positions_match_sdpa(new, window):
    _needs_fa3()
    g = torch.Generator(device="cuda").manual_seed(3)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    base_k, base_v = torch.randn(3, 64, 2, 32, generator=g, **kw), torch.randn(3, 64, 2, 32, generator=g, **kw)
    q, k, v = torch.randn(3, new, 4, 32, generator=g, **kw), *(torch.randn(3, new, 2, 32, generator=g, **kw) for _ in range(2))

    def run():
        k_cache, v_cache = base_k.clone(), base_v.clone()
        seqlens = torch.tensor([5, 30, 17], dtype=torch.int32, device="cuda")
        out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True,
                                         window_size=(window, 0))
        return out, k_cache

    (a, ka), (b, kb) = both_impls(run)
    assert torch.equal(ka, kb)  # both wrote each row's new keys at its own length
    assert_close(a, b, atol=1e-2)


@pytest.mark.gpu
def test_fa3_backward_matches_sdpa():
    _needs_fa3()
    g = torch.Generator(device="cuda").manual_seed(2)
    base = [torch.randn(2, 32, 4, 16, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]

    def run():
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = fa.flash_attn_func(q, k, v, causal=True, window_size=(32, 0))
        out.float().square().sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    a, b = both_impls(run)
    assert_close(a[0], b[0], atol=1e-2)
    for ga, gb in zip(a[1:], b[1:]):
        assert torch.allclose(ga.float(), gb.float(), atol=0.05, rtol=0.05)
