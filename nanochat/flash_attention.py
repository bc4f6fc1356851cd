"""
Causal attention with sliding windows behind FA3's signature and (B, T, H, D) layout: Flash Attention 3
where it loads, compiled FlexAttention for masked calls on other CUDA GPUs, PyTorch SDPA everywhere else.

    from nanochat.flash_attention import flash_attn
    y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(512, 0))          # training / no cache
    y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                           cache_seqlens=seqlens, causal=True, window_size=(512, 0))

Windows follow FA3: left window w lets query i see keys i - w <= j <= i; w < 0 is unlimited. Causal only.
`attention_plan` is the one place that decides which kernel runs; `set_impl` forces one (tests, benchmarks).

Tests: python -m pytest tests/test_attention_fallback.py -q            (flex parity on CPU: -m slow)
"""

import logging
import os
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanochat.common import get_dist_info

log = logging.getLogger("nanochat.flash_attention")

# Hopper (SM 9.x) has its own FA3 build; the community build covers Ampere and Ada (sm80/86/89) and, via
# the Torch stable ABI, loads on any torch >= 2.9 where per-version builds lag behind. Others get no FA3.
HOPPER_FA3_REPO = "varunneal/flash-attention-3"
COMMUNITY_FA3_REPO = "kernels-community/flash-attn3"
IMPLS = ("fa3", "flex", "sdpa")

_fa3 = None  # the loaded flash_attn_interface module, or None
_fa3_reason = None  # why FA3 is (not) available; None until the first load attempt
_override_impl = None  # set_impl's choice: None (automatic), "fa3", "flex" or "sdpa"

# PyTorch's fused CPU attention in bf16 rounds the softmax probabilities (and in backward the score gradients)
# to bf16 between its matmuls, which alone made d4 CPU pretraining spike and lag the fp32 curve
# (bench/bench_precision_cpu.py); attending in fp32 from the bf16 inputs keeps the fp32 curve. CUDA keeps bf16.
CPU_ATTENTION_IN_FP32 = True


def load_fa3():
    """(module or None, reason): loads FA3 from the Hugging Face `kernels` hub on the first call only (never at
    import), and logs once why it did or did not load."""
    global _fa3, _fa3_reason
    if _fa3_reason is not None:
        return _fa3, _fa3_reason
    module, reason = None, None
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    else:
        try:
            import kernels
        except ImportError:
            reason = "the `kernels` package is not installed (install the GPU extra: `uv sync --extra gpu`)"
        else:
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            major, minor = torch.cuda.get_device_capability(0)
            failures = []
            for repo in (HOPPER_FA3_REPO, COMMUNITY_FA3_REPO) if major == 9 else (COMMUNITY_FA3_REPO,):
                try:
                    if major != 9 and not kernels.has_kernel(repo):
                        failures.append(f"no FA3 kernel build for SM {major}{minor}")
                        continue
                    module = kernels.get_kernel(repo).flash_attn_interface
                    reason = f"loaded {repo} for SM {major}{minor}"
                    break
                except Exception as e:  # hub unreachable, build missing, ABI mismatch: all mean "try the next, then SDPA"
                    failures.append(f"loading {repo} failed ({type(e).__name__}: {e})")
            if module is None:
                reason = "; ".join(failures)
    _fa3, _fa3_reason = module, reason
    if module is None:
        log.info("Flash Attention 3 unavailable: %s; using PyTorch SDPA", reason)
    else:
        log.info("Flash Attention 3: %s", reason)
    return module, reason


def set_impl(impl):
    """Force the implementation: "fa3" (raises if FA3 can't load), "flex", "sdpa", or None for automatic.
    Forced "flex" takes every call but single-token decode and ragged cache rows, on any device (CPU: eager)."""
    global _override_impl
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"attention implementation must be 'fa3', 'flex', 'sdpa' or None, got {impl!r}")
    if impl == "fa3" and load_fa3()[0] is None:
        raise RuntimeError(f"FA3 was requested but is not available: {_fa3_reason}")
    _override_impl = impl


class AttentionPlan(NamedTuple):
    impl: str  # "fa3", "flex" or "sdpa": the kernel of the windowed training / prefill calls
    reason: str
    forced: bool  # set by set_impl: a forced "flex" also takes the calls SDPA could run without a mask
    dtype: torch.dtype  # the dtype attention is computed in (fp32 for reduced precision on CPU)

    def kernel(self, Tq, Tk, window):
        """The kernel of one call: Tq queries (the last Tq positions) against Tk keys with left `window`."""
        if self.impl == "fa3":
            return "fa3"
        if Tq == 1 or self.impl == "sdpa":
            return "sdpa"  # decode crops the keys to the window: SDPA needs no mask
        # Full-context causal calls ("L" layers) need no mask and SDPA's flash kernel is as good as it gets;
        # FlexAttention wins where SDPA needs an explicit mask (short windows, chunks after cached keys).
        needs_mask = not ((window < 0 or window >= Tq) and Tq == Tk)
        return "flex" if self.forced or needs_mask else "sdpa"


def attention_plan(device_type, dtype):
    """How attention on `dtype` tensors on `device_type` runs, and why. The model's every call asks this;
    on CUDA the first call loads FA3, so make it before torch.compile sees the model."""
    upcast = CPU_ATTENTION_IN_FP32 and device_type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    math_dtype = torch.float32 if upcast else dtype
    if _override_impl is not None and (_override_impl != "fa3" or device_type == "cuda"):
        return AttentionPlan(_override_impl, f"forced with set_impl({_override_impl!r})", True, math_dtype)
    if device_type != "cuda":
        return AttentionPlan("sdpa", f"no FA3 or compiled FlexAttention on {device_type}", False, math_dtype)
    fa3, reason = load_fa3()
    if fa3 is not None and dtype == torch.bfloat16:  # FA3 here runs bf16 (and fp8) only
        return AttentionPlan("fa3", reason, False, dtype)
    if fa3 is not None:
        reason = f"FA3 is loaded but the compute dtype is {dtype}, and FA3 runs only in bf16"
    return AttentionPlan("flex", reason, False, dtype)


_hopper_warned = False


def log_attention_plan(device, dtype, window_pattern):
    """Log once, at startup, which attention kernel a training run uses and why; returns the plan."""
    global _hopper_warned
    plan = attention_plan(device.type, dtype)
    if (plan.impl != "fa3" and device.type == "cuda" and dtype == torch.bfloat16 and not _hopper_warned
            and get_dist_info()[1] == 0 and torch.cuda.get_device_capability(device)[0] == 9):
        # A Hopper run without FA3 trains correctly but slower, which an INFO line hides in a speedrun's log.
        _hopper_warned = True
        log.warning("Flash Attention 3 did not load on this Hopper GPU (%s). Attention runs instead on compiled "
                    "FlexAttention for the sliding-window layers and on SDPA's FA2-class flash kernel for the full-context "
                    "ones: expect attention about 1.5-2x slower than with FA3 (the FA3 paper's H100 bf16 comparison "
                    "with FA2) and a lower MFU. To get FA3: `uv sync --extra gpu`, access to the Hugging Face hub on the "
                    "first run (HF_HUB_OFFLINE unset), and a torch that the kernel has a build for "
                    "(README, Flash Attention 3)", plan.reason)
    if plan.impl == "fa3":
        log.info("Attention: Flash Attention 3 (%s)", plan.reason)
    elif plan.impl == "flex":
        log.info("Attention: compiled FlexAttention for sliding windows and masked prefill, PyTorch SDPA for full-context "
                 "layers and decode, on %s (%s)", device.type, plan.reason)
    else:
        log.info("Attention: PyTorch SDPA on %s (%s)", device.type, plan.reason)
        if window_pattern.upper() != "L":
            log.warning("SDPA has no sliding-window kernel: --window-pattern %s runs masked attention; "
                        "--window-pattern L is usually faster without FA3", window_pattern)
    return plan


# -----------------------------------------------------------------------------
# FlexAttention (imported on first use: torch._dynamo and flex_attention cost seconds at import)


_compiled_flex = None  # torch.compile(flex_attention), created on the first CUDA call
_block_masks = {}  # (Tq, Tk, window, device) -> BlockMask, built outside compiled graphs
_MAX_BLOCK_MASKS = 64  # inference sees a new (Tq, Tk) per prompt length: keep the cache bounded


def _visible(pos, key, window):
    """The one masking rule of every path: a query at absolute position `pos` sees key position `key` when
    key <= pos and, with a window (w >= 0), pos - key <= w. Broadcasts over tensors."""
    return key <= pos if window < 0 else (key <= pos) & (pos - key <= window)


def _make_block_mask(Tq, Tk, window, device):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = Tk - Tq  # query q_idx sits at absolute position q_idx + offset
    return create_block_mask(lambda b, h, q_idx, kv_idx: _visible(q_idx + offset, kv_idx, window), None, None, Tq, Tk,
                             device=device)


def _block_mask(Tq, Tk, window, device):
    """The BlockMask of a causal, left-windowed attention of the last Tq of Tk positions."""
    if not 0 <= window < Tk:
        window = -1  # a window covering every key is plain causal: one cache entry for -1, T, 2T...
    if torch.compiler.is_compiling():
        # Inside a compiled model the graph builds the mask itself: a few elementwise kernels per step, and
        # no Python dict for the compiler to guard on.
        return _make_block_mask(Tq, Tk, window, device)
    key = (Tq, Tk, window, device)
    mask = _block_masks.get(key)
    if mask is None:
        if len(_block_masks) >= _MAX_BLOCK_MASKS:
            _block_masks.pop(next(iter(_block_masks)))  # the oldest entry
        mask = _block_masks[key] = _make_block_mask(Tq, Tk, window, device)
    return mask


def _flex_kernel(device):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    # Eager FlexAttention materialises the scores, so CUDA compiles it (once per process); CPU runs it eagerly
    # (parity tests), and an already compiled model traces the plain function into its own graph.
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        log.info("FlexAttention: compiling flex_attention for sliding-window attention (once per process)")
        # Default dynamic shapes: eager callers (evaluation, prefill) bring a new length per prompt, and a
        # second length makes the compiler generalise instead of recompiling for each.
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _flex_attention(q, k, v, window_size, enable_gqa):
    block_mask = _block_mask(q.size(2), k.size(2), window_size[0], q.device)
    return _flex_kernel(q.device)(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


# -----------------------------------------------------------------------------
# SDPA


def _sdpa_math(q, k, v, window_size, enable_gqa, mask=None):
    """Causal attention on (B, H, T, D) tensors with a left window; the queries are the LAST Tq key positions.
    mask: an explicit (B, 1, Tq, Tk) mask replacing causality and window, boolean (True = attend) or additive."""
    if mask is not None:
        # A boolean mask goes in as an additive 0/-inf one: CPU SDPA takes that ~15% faster (decode, 16 rows x 300 keys).
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=enable_gqa)
    window = window_size[0]
    Tq, Tk = q.size(2), k.size(2)
    if (window < 0 or window >= Tq) and Tq == Tk:  # plain causal ("L" layers in training)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if Tq == 1:  # decode: crop the keys to the window, no mask
        if 0 <= window < Tk:
            start = max(0, Tk - (window + 1))
            k, v = k[:, :, start:], v[:, :, start:]
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=enable_gqa)
    row = (Tk - Tq) + torch.arange(Tq, device=q.device).unsqueeze(1)  # (Tq, 1) absolute query positions
    mask = _visible(row, torch.arange(Tk, device=q.device), window)  # (Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def _attend(plan, q, k, v, window_size, enable_gqa, mask=None):
    """Flex or SDPA on (B, H, T, D) tensors, as the plan says, in the plan's dtype; returns q's dtype.
    A caller's explicit mask (ragged cache rows) always goes to SDPA."""
    dtype = q.dtype
    q, k, v = q.to(plan.dtype), k.to(plan.dtype), v.to(plan.dtype)  # no-ops unless CPU attends in fp32
    if mask is None and plan.kernel(q.size(2), k.size(2), window_size[0]) == "flex":
        return _flex_attention(q, k, v, window_size, enable_gqa).to(dtype)
    return _sdpa_math(q, k, v, window_size, enable_gqa, mask).to(dtype)


def _check_causal(causal):
    if not causal:
        raise ValueError("only causal attention is implemented (pass causal=True)")


# -----------------------------------------------------------------------------
# Public API (FA3 signature, (B, T, H, D) layout)


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0 -> (B, T, H, D) in q's dtype.
    window_size = (left, right) in FA3 convention; right must be 0."""
    _check_causal(causal)
    plan = attention_plan(q.device.type, q.dtype)
    if plan.impl == "fa3":
        return _fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size)
    y = _attend(plan, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size,
                enable_gqa=q.size(2) != k.size(2))  # (B, H, T, D)
    return y.transpose(1, 2)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                            window_size=(-1, -1), cache_pos=None):
    """Attention of new queries against a KV cache, after writing the new keys/values into it in place.
    q: (B, Tn, H, D); k_cache, v_cache: (B, T_max, Hkv, D); k, v: (B, Tn, Hkv, D) or None (the queries are then
    the last Tn cached positions); cache_seqlens: (B,) int32 filled positions per row, which may differ (each row
    sees only its own keys). cache_pos: their host copy (an int or per-row ints): spares SDPA a sync per layer."""
    _check_causal(causal)
    plan = attention_plan(q.device.type, q.dtype)
    if plan.impl == "fa3":  # FA3 reads cache_seqlens on the device and ignores cache_pos
        return _fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                            causal=causal, window_size=window_size)
    if k_cache.dtype != q.dtype:
        raise ValueError(f"KV cache is {k_cache.dtype} but the queries are {q.dtype}; allocate the cache in the "
                         "model's compute dtype (model.compute_dtype)")
    if cache_pos is None:
        lengths = cache_seqlens.tolist()
        cache_pos = lengths[0] if len(set(lengths)) == 1 else lengths
    if isinstance(cache_pos, (list, tuple)):
        if len(set(cache_pos)) > 1:
            return _kvcache_ragged(plan, q, k_cache, v_cache, k, v, cache_seqlens, cache_pos, window_size)
        cache_pos = cache_pos[0]
    pos = end = int(cache_pos)
    if k is not None:
        end = pos + k.size(1)
        _check_room(pos, k.size(1), k_cache.size(1))
        k_cache[:, pos:end] = k
        v_cache[:, pos:end] = v
    k_full, v_full = k_cache[:, :end], v_cache[:, :end]
    y = _attend(plan, q.transpose(1, 2), k_full.transpose(1, 2), v_full.transpose(1, 2), window_size,
                enable_gqa=q.size(2) != k_cache.size(2))
    return y.transpose(1, 2)


def _check_room(cached, new, capacity):
    if cached + new > capacity:
        raise RuntimeError(f"KV cache overflow: {cached} cached + {new} new positions > capacity {capacity}; "
                           "allocate the cache with room for the prompt plus every generated token")


def _kvcache_ragged(plan, q, k_cache, v_cache, k, v, cache_seqlens, lengths, window_size):
    """SDPA over rows holding different numbers of positions (host `lengths`): each row writes at its own
    length, and one mask keeps each query to its own row's keys within its window."""
    B, Tn = q.size(0), q.size(1)
    if len(lengths) != B:
        raise ValueError(f"cache_pos lists {len(lengths)} row lengths for a batch of {B} rows")
    new = 0 if k is None else k.size(1)
    if new:
        _check_room(max(lengths), new, k_cache.size(1))
    start, end, qpos, bias = _ragged_mask(cache_seqlens, tuple(lengths), new, Tn, window_size[0], plan.dtype, q.device)
    if new:
        rows = torch.arange(B, device=q.device).unsqueeze(1)  # (B, 1)
        k_cache[rows, qpos] = k  # (B, Tn, Hkv, D) scattered to each row's own positions
        v_cache[rows, qpos] = v
    # The keys are the union of every row's [0, end), cropped on the left to what the widest window needs.
    y = _attend(plan, q.transpose(1, 2), k_cache[:, start:end].transpose(1, 2), v_cache[:, start:end].transpose(1, 2),
                window_size, enable_gqa=q.size(2) != k_cache.size(2), mask=bias)
    return y.transpose(1, 2)


_last_ragged_mask = None  # (key, value) of the last _ragged_mask call: every layer of a step asks for the same one


def _ragged_mask(cache_seqlens, lengths, new, Tn, window, dtype, device):
    """(start, end, qpos, bias): keys [start, end) of the cache, each query's (B, Tn) absolute position, and the
    (B, 1, Tn, end - start) additive mask. Depends only on the rows' lengths: built once per step, not per layer."""
    global _last_ragged_mask
    key = (lengths, new, Tn, window, dtype, device)
    memo = _last_ragged_mask  # read once: another replica's thread may replace it meanwhile
    if memo is not None and memo[0] == key:
        return memo[1]
    offsets = torch.arange(Tn, device=device)
    # Without new keys, the queries are the last Tn cached positions of each row.
    qpos = (cache_seqlens.to(device=device, dtype=torch.long) + (new - Tn)).unsqueeze(1) + offsets
    end = max(lengths) + new
    start = max(0, min(lengths) + new - Tn - window) if window >= 0 else 0
    # (B, Tn, Tk): causal, within the window, and nothing past the row's own end
    visible = _visible(qpos.unsqueeze(-1), torch.arange(start, end, device=device), window)
    bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf")).unsqueeze(1)
    value = (start, end, qpos, bias)
    _last_ragged_mask = (key, value)
    return value


flash_attn = SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache)
