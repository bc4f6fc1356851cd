"""Tests of nanochat/flash_attention.py: the SDPA fallback against naive masked attention (causal,
sliding windows, GQA, KV-cache prefill and decode with windows, gradients), the lazy FA3 loading, the
override switch and which kernel each call picks (fa3 / flex / sdpa); FlexAttention forced on CPU
against the naive reference; on a GPU, FA3 and compiled FlexAttention against SDPA.

    python -m pytest tests/test_attention_fallback.py -q            (CPU)
    python -m pytest tests/test_attention_fallback.py -q -m slow    (FlexAttention on CPU: imports torch._dynamo)
    python -m pytest tests/test_attention_fallback.py -q -m gpu     (FA3 / flex vs SDPA, needs CUDA)
"""

import importlib.util
import logging
import math
import subprocess
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
        assert fa.load_fa3()[0] is None
        assert fa.load_fa3()[0] is None
        assert fa.load_fa3() == (None, "no CUDA device")
    records = [r for r in caplog.records if r.name == "nanochat.flash_attention"]
    assert len(records) == 1 and "no CUDA device" in records[0].getMessage()


def test_missing_kernels_package_falls_back(monkeypatch):
    monkeypatch.setattr(fa, "_fa3", None)
    monkeypatch.setattr(fa, "_fa3_reason", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "kernels", None)  # makes `import kernels` raise ImportError
    assert fa.load_fa3()[0] is None
    assert "kernels" in fa.load_fa3()[1]


def test_override_mechanism():
    fa.set_impl("sdpa")
    assert fa.attention_plan("cuda", torch.bfloat16).impl == "sdpa"
    fa.set_impl(None)
    assert fa.attention_plan("cuda", torch.float32).impl != "fa3"  # FA3 never runs fp32
    assert (fa.attention_plan("cuda", torch.bfloat16).impl == "fa3") == (fa.load_fa3()[0] is not None)
    fa.set_impl("flex")
    assert fa.attention_plan("cuda", torch.bfloat16).impl == "flex"
    with pytest.raises(ValueError, match="sdpa"):
        fa.set_impl("flash")
    if fa.load_fa3()[0] is None:
        with pytest.raises(RuntimeError, match="FA3"):
            fa.set_impl("fa3")


# -----------------------------------------------------------------------------
# Which kernel a call runs (CPU, by monkeypatching what the machine has)


class FakeCudaTensor:
    """Enough of a CUDA tensor for the choice of kernel (device, dtype, size); never computed on."""

    def __init__(self, Tq, dtype=torch.bfloat16):
        self.device, self.dtype, self.is_cuda, self.shape = torch.device("cuda"), dtype, True, (2, Tq, 4, 16)

    def size(self, dim):
        return self.shape[dim]


def kernel_for(q, Tk, window):
    """What flash_attn_func / flash_attn_with_kvcache would run for q against Tk keys."""
    return fa.attention_plan(q.device.type, q.dtype).kernel(q.size(1), Tk, window)


@pytest.fixture
def cuda_without_fa3(monkeypatch):
    monkeypatch.setattr(fa, "_fa3", None)
    monkeypatch.setattr(fa, "_fa3_reason", "no FA3 kernel build for SM 100")
    monkeypatch.setattr(fa, "_override_impl", None)


@pytest.fixture
def cuda_with_fa3(monkeypatch):
    monkeypatch.setattr(fa, "_fa3", object())
    monkeypatch.setattr(fa, "_fa3_reason", "loaded varunneal/flash-attention-3 for SM 90")
    monkeypatch.setattr(fa, "_override_impl", None)


def test_cuda_without_fa3_sends_sliding_windows_to_flex(cuda_without_fa3):
    T = 2048
    assert kernel_for(FakeCudaTensor(T), T, 512) == "flex"  # an "S" layer in training
    assert kernel_for(FakeCudaTensor(T), T, T) == "sdpa"  # an "L" layer: SDPA's causal flash kernel
    assert kernel_for(FakeCudaTensor(T), T, -1) == "sdpa"
    assert kernel_for(FakeCudaTensor(1), 700, 512) == "sdpa"  # decode: the crop path, no mask
    assert kernel_for(FakeCudaTensor(16), 80, T) == "flex"  # a chunk appended to a non-empty cache
    assert kernel_for(FakeCudaTensor(T, torch.float32), T, 512) == "flex"  # pre-Ampere fp32 too
    assert fa.attention_plan("cuda", torch.bfloat16)[:2] == ("flex", "no FA3 kernel build for SM 100")


def test_sssl_model_layers_pick_flex_for_short_windows_on_cuda_without_fa3(cuda_without_fa3):
    from nanochat.gpt import GPTConfig, window_sizes_for

    config = GPTConfig(sequence_len=2048, n_layer=8, window_pattern="SSSL")
    kernels = [kernel_for(FakeCudaTensor(2048), 2048, w) for w, _ in window_sizes_for(config)]
    assert kernels == ["flex", "flex", "flex", "sdpa"] * 2


def test_fa3_wins_when_it_loaded(cuda_with_fa3):
    assert kernel_for(FakeCudaTensor(2048), 2048, 512) == "fa3"
    assert kernel_for(FakeCudaTensor(1), 700, 512) == "fa3"
    assert kernel_for(FakeCudaTensor(2048, torch.float32), 2048, 512) == "flex"  # FA3 runs bf16 only
    assert fa.attention_plan("cuda", torch.bfloat16)[0] == "fa3"
    assert fa.attention_plan("cuda", torch.float32)[0] == "flex"


def test_cpu_defaults_stay_on_sdpa():
    fa._override_impl = None
    for Tq, Tk, window in ((64, 64, 8), (64, 64, -1), (16, 80, 100), (1, 80, 8)):
        assert fa.attention_plan("cpu", torch.float32).kernel(Tq, Tk, window) == "sdpa"
    impl, reason = fa.attention_plan("cpu", torch.float32)[:2]
    assert impl == "sdpa" and "cpu" in reason


def test_forcing_flex_and_sdpa(cuda_with_fa3):
    fa.set_impl("flex")
    assert kernel_for(FakeCudaTensor(64), 64, -1) == "flex"  # every multi-token call, even full context
    assert kernel_for(FakeCudaTensor(1), 64, 8) == "sdpa"  # decode stays on the crop path
    assert fa.attention_plan("cpu", torch.float32).kernel(64, 64, 8) == "flex"
    assert fa.attention_plan("cpu", torch.float32)[0] == "flex"
    fa.set_impl("sdpa")
    assert kernel_for(FakeCudaTensor(64), 64, 8) == "sdpa"


def test_cpu_attends_reduced_precision_in_fp32(cuda_with_fa3, monkeypatch):
    assert fa.attention_plan("cpu", torch.bfloat16).dtype == torch.float32
    assert fa.attention_plan("cpu", torch.float16).dtype == torch.float32
    assert fa.attention_plan("cuda", torch.bfloat16).dtype == torch.bfloat16  # the GPU recipe stays bf16
    monkeypatch.setattr(fa, "CPU_ATTENTION_IN_FP32", False)
    assert fa.attention_plan("cpu", torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("impl,forced,model_kernels,cache_kernels", [
    ("fa3", False, ["fa3", "fa3"], ["fa3", "fa3", "fa3"]),
    ("flex", False, ["flex", "sdpa"], ["flex", "sdpa", "sdpa"]),  # S layer masked, L layer plain causal
    ("flex", True, ["flex", "flex"], ["flex", "sdpa", "sdpa"]),
    ("sdpa", False, ["sdpa", "sdpa"], ["sdpa", "sdpa", "sdpa"]),
])
def test_every_call_runs_the_logged_plan(monkeypatch, caplog, tiny_gpt, impl, forced, model_kernels, cache_kernels):
    # Whatever attention_plan decides (here: each machine's decision, mocked on CPU), the startup log and every
    # call of the model and the KV cache follow it: a second rule in the call path would show up as a mismatch.
    from types import SimpleNamespace

    ran = []
    real_sdpa = fa._sdpa_math

    def fake_fa3(q, *args, window_size, **kwargs):
        ran.append("fa3")
        return torch.zeros_like(q)

    monkeypatch.setattr(fa, "_fa3", SimpleNamespace(flash_attn_func=fake_fa3, flash_attn_with_kvcache=fake_fa3))
    monkeypatch.setattr(fa, "_flex_attention", lambda q, k, v, w, gqa: ran.append("flex") or real_sdpa(q, k, v, w, gqa))
    monkeypatch.setattr(fa, "_sdpa_math", lambda q, k, v, w, gqa, mask=None: ran.append("sdpa") or real_sdpa(q, k, v, w, gqa, mask))
    plan = fa.AttentionPlan(impl, "mocked", forced, torch.float32)
    monkeypatch.setattr(fa, "attention_plan", lambda device_type, dtype: plan)
    caplog.set_level(logging.INFO, logger="nanochat.flash_attention")
    assert fa.log_attention_plan(torch.device("cpu"), torch.float32, "SL") is plan
    name = {"fa3": "Flash Attention 3", "flex": "FlexAttention", "sdpa": "PyTorch SDPA"}[impl]
    assert name in caplog.records[0].getMessage() and "(mocked)" in caplog.records[0].getMessage()

    model = tiny_gpt(n_layer=2, sequence_len=512, window_pattern="SL")  # windows 128 (S) and 512 (L)
    model(torch.randint(0, 265, (1, 200)))
    assert ran == model_kernels
    ran.clear()
    q, k = rand(2, 4, 2, 16), rand(2, 4, 2, 16, seed=1)
    k_cache, v_cache = torch.zeros(2, 32, 2, 16), torch.zeros(2, 32, 2, 16)
    seqlens = torch.tensor([8, 8], dtype=torch.int32)
    fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=k, cache_seqlens=seqlens, causal=True, window_size=(6, 0))
    fa.flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, k=k[:, :1], v=k[:, :1], cache_seqlens=seqlens + 4,
                               causal=True, window_size=(6, 0))  # decode
    fa.flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, k=k[:, :1], v=k[:, :1], cache_seqlens=seqlens,
                               causal=True, window_size=(6, 0), cache_pos=[9, 12])  # rows at different lengths
    assert ran == cache_kernels


def test_attention_plan_log_counts_fa3_only_in_bf16(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(fa, "load_fa3", lambda: (object(), "loaded for SM 90"))
    monkeypatch.setattr(fa, "_override_impl", None)
    fa.log_attention_plan(torch.device("cuda"), torch.float32, "L")
    fa.log_attention_plan(torch.device("cuda"), torch.bfloat16, "SSSL")
    lines = [r.getMessage() for r in caplog.records]
    assert "PyTorch SDPA" in lines[0] and "runs only in bf16" in lines[0]
    assert lines[1] == "Attention: Flash Attention 3 (loaded for SM 90)"


def test_hopper_without_fa3_warns_once_on_rank_0(monkeypatch, caplog):
    from types import SimpleNamespace

    def get_kernel(repo):
        raise FileNotFoundError(f"no build of {repo} for this torch")

    monkeypatch.setattr(fa, "_fa3", None)
    monkeypatch.setattr(fa, "_fa3_reason", None)
    monkeypatch.setattr(fa, "_override_impl", None)
    monkeypatch.setattr(fa, "_hopper_warned", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "kernels", SimpleNamespace(get_kernel=get_kernel, has_kernel=lambda repo: True))
    caplog.set_level(logging.INFO)
    for _ in range(2):
        fa.log_attention_plan(torch.device("cuda"), torch.bfloat16, "SSSL")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    text = warnings[0]
    assert text.startswith("Flash Attention 3 did not load on this Hopper GPU (loading varunneal/flash-attention-3 failed")
    assert "loading kernels-community/flash-attn3 failed" in text  # the stable-ABI build was tried too
    assert "FlexAttention" in text and "1.5-2x slower" in text and "uv sync --extra gpu" in text
    # another rank stays quiet
    monkeypatch.setattr(fa, "_hopper_warned", False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    fa.log_attention_plan(torch.device("cuda"), torch.bfloat16, "SSSL")
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_choosing_loads_no_flex_attention():
    # The choice itself and an SDPA call import nothing heavy (the import budget of tests/test_imports.py).
    code = ("import sys, torch; from nanochat import flash_attention as fa; "
            "q = torch.randn(1, 8, 2, 4); fa.flash_attn_func(q, q, q, causal=True, window_size=(3, 0)); "
            "fa.attention_plan('cpu', torch.float32); "
            "print('torch._dynamo' in sys.modules, 'torch.nn.attention.flex_attention' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]


def test_block_mask_cache_is_keyed_and_bounded(monkeypatch):
    built = []
    monkeypatch.setattr(fa, "_make_block_mask", lambda Tq, Tk, w, device: built.append((Tq, Tk, w)) or object())
    monkeypatch.setattr(fa, "_block_masks", {})
    cpu = torch.device("cpu")
    a = fa._block_mask(64, 64, 8, cpu)
    assert fa._block_mask(64, 64, 8, cpu) is a
    assert fa._block_mask(64, 64, -1, cpu) is fa._block_mask(64, 64, 64, cpu) is fa._block_mask(64, 64, 500, cpu)
    assert built == [(64, 64, 8), (64, 64, -1)]
    for t in range(2 * fa._MAX_BLOCK_MASKS):
        fa._block_mask(t + 2, t + 2, 1, cpu)
    assert len(fa._block_masks) == fa._MAX_BLOCK_MASKS


# -----------------------------------------------------------------------------
# FlexAttention forced on CPU vs naive attention. Slow: the first FlexAttention call imports torch._dynamo
# and builds its first block mask (~15 s on one core); each call after that takes well under a second.


# Eager FlexAttention is what these tests want (the CPU reference path); its warning says so on every run.
EAGER_FLEX_OK = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def flex():
    fa.set_impl("flex")
    fa._block_masks.clear()
    yield
    fa._block_masks.clear()


@pytest.mark.slow
@EAGER_FLEX_OK
@pytest.mark.parametrize("T,window", [(48, -1), (48, 0), (48, 1), (48, 7), (48, 31), (48, 48), (48, 200), (3, 1), (1, -1)])
def test_flex_matches_naive(flex, T, window):
    q, k, v = rand(2, T, 4, 16, seed=70), rand(2, T, 4, 16, seed=71), rand(2, T, 4, 16, seed=72)
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    assert out.shape == (2, T, 4, 16) and out.dtype == torch.float32
    assert_close(out, naive_attention(q, k, v, window))


@pytest.mark.slow
@EAGER_FLEX_OK
@pytest.mark.parametrize("window", [-1, 5])
def test_flex_gqa_matches_naive(flex, window):
    q, k, v = rand(1, 40, 8, 16, seed=73), rand(1, 40, 2, 16, seed=74), rand(1, 40, 2, 16, seed=75)
    assert_close(fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0)), naive_attention(q, k, v, window))


@pytest.mark.slow
@EAGER_FLEX_OK
@pytest.mark.parametrize("cached,new,window,hkv", [(0, 16, -1, 4), (20, 6, 5, 2), (30, 10, 200, 1)])
def test_flex_prefill_into_cache_matches_naive(flex, cached, new, window, hkv):
    B, H, D, t_max = 2, 4, 16, 64
    k_cache, v_cache, seqlens = filled_cache(B, t_max, hkv, D, cached, seed=76)
    q, k, v = rand(B, new, H, D, seed=77), rand(B, new, hkv, D, seed=78), rand(B, new, hkv, D, seed=79)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True,
                                     window_size=(window, 0))
    assert torch.equal(k_cache[:, cached:cached + new], k)
    assert_close(out, naive_attention(q, k_cache[:, :cached + new], v_cache[:, :cached + new], window))


@pytest.mark.slow
@EAGER_FLEX_OK
def test_flex_bf16_on_cpu_is_attended_in_fp32(flex):
    q, k, v = (rand(1, 32, 2, 16, seed=s).bfloat16() for s in (80, 81, 82))
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(7, 0))
    assert out.dtype == torch.bfloat16
    assert_close(out, naive_attention(q, k, v, 7).to(torch.bfloat16), atol=0)


# Gradients through forced FlexAttention need CUDA: eager FlexAttention on CPU has no backward (it refuses
# inputs that require grad).
@pytest.mark.gpu
@pytest.mark.parametrize("window,hkv", [(5, 4), (-1, 2)])
def test_flex_gradients_match_naive(flex, window, hkv):
    _needs_cuda()
    q = rand(2, 32, 4, 16, seed=83).cuda().requires_grad_()
    k, v = (rand(2, 32, hkv, 16, seed=s).cuda().requires_grad_() for s in (84, 85))
    fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0)).square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive_attention(q2, k2, v2, window).square().sum().backward()
    for g, ref in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        assert_close(g, ref, atol=1e-4)


# -----------------------------------------------------------------------------
# FA3 vs SDPA (GPU with FA3 only)


def _needs_fa3():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if fa.load_fa3()[0] is None:
        pytest.skip(f"FA3 unavailable: {fa.load_fa3()[1]}")


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


# -----------------------------------------------------------------------------
# Compiled FlexAttention vs SDPA (CUDA)


def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,Hkv,D,window", [
    (2, 256, 4, 4, 64, 64), (2, 256, 4, 4, 64, 0), (2, 300, 8, 2, 64, 31), (1, 1024, 6, 6, 128, 256),
    (2, 128, 4, 4, 32, -1),
])
def test_compiled_flex_matches_sdpa_bf16(B, T, H, Hkv, D, window):
    _needs_cuda()
    g = torch.Generator(device="cuda").manual_seed(4)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    base = [torch.randn(B, T, h, D, generator=g, **kw) for h in (H, Hkv, Hkv)]

    def run(impl):
        fa.set_impl(impl)
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        out.float().square().sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    a, b = run("flex"), run("sdpa")
    assert fa._compiled_flex is not None  # the CUDA path ran compiled, not eager
    assert_close(a[0], b[0], atol=2e-2)
    for ga, gb in zip(a[1:], b[1:]):
        assert torch.allclose(ga.float(), gb.float(), atol=0.05, rtol=0.05)


@pytest.mark.gpu
def test_compiled_flex_prefill_into_cache_matches_sdpa():
    _needs_cuda()
    g = torch.Generator(device="cuda").manual_seed(5)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    base_k, base_v = torch.randn(2, 256, 2, 64, generator=g, **kw), torch.randn(2, 256, 2, 64, generator=g, **kw)
    base_k[:, 100:], base_v[:, 100:] = 0, 0
    q, k, v = torch.randn(2, 40, 4, 64, generator=g, **kw), *(torch.randn(2, 40, 2, 64, generator=g, **kw) for _ in range(2))

    def run(impl):
        fa.set_impl(impl)
        k_cache, v_cache = base_k.clone(), base_v.clone()
        seqlens = torch.full((2,), 100, dtype=torch.int32, device="cuda")
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True,
                                          window_size=(64, 0))

    assert_close(run("flex"), run("sdpa"), atol=2e-2)


@pytest.mark.gpu
def test_sssl_model_on_cuda_without_fa3_runs_flex_for_short_windows(monkeypatch, tiny_gpt):
    _needs_cuda()
    monkeypatch.setattr(fa, "_fa3", None)
    monkeypatch.setattr(fa, "_fa3_reason", "pretend: no FA3 on this GPU")
    fa.set_impl(None)
    calls = []
    real = fa._flex_attention
    monkeypatch.setattr(fa, "_flex_attention", lambda q, k, v, w, gqa: calls.append(w[0]) or real(q, k, v, w, gqa))
    model = tiny_gpt(n_layer=4, n_embd=128, n_head=1, n_kv_head=1, sequence_len=512, window_pattern="SSSL",
                     compute_dtype=torch.bfloat16, device="cuda")
    idx = torch.randint(0, 265, (2, 512), device="cuda")
    loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    assert calls == [128, 128, 128]  # the three S layers (window 512/4 = 128); the last, L, stays on SDPA
    assert fa.attention_plan("cuda", torch.bfloat16)[0] == "flex"
