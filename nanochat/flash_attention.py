"""
Causal attention with sliding windows: Flash Attention 3 where it runs, PyTorch FlexAttention for
sliding windows on other CUDA GPUs, PyTorch SDPA everywhere else.

Both entry points take FA3's signature and its (B, T, H, D) layout, so the model never needs to know
which implementation ran:

    from nanochat.flash_attention import flash_attn
    y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(512, 0))          # training / no cache
    y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                           cache_seqlens=seqlens, causal=True, window_size=(512, 0))

Window semantics follow FA3: with left window w, query i attends keys j with i - w <= j <= i (at most w+1
keys); w < 0 means unlimited. Only causal attention is supported.

Which kernel runs a call, decided by the same rule for every call of the process (`attention_plan` says it
in one line for the startup log):
  - fa3: bf16 CUDA tensors when FA3 loaded. FA3 comes from the Hugging Face `kernels` hub and is loaded
    lazily, on first use (never at import), once per process; when it can't be loaded (no CUDA, no
    `kernels` package, no kernel for this GPU, hub unreachable) the reason is logged once.
  - flex: without FA3 on CUDA, every call SDPA could only run with an explicit (Tq, Tk) mask: training
    and prefill with a window shorter than the sequence ("S" layers), and chunks appended to a non-empty
    cache. FlexAttention skips the masked-out key blocks instead of computing and discarding them; it is
    compiled (torch.compile(flex_attention), once per process) because eager FlexAttention materialises
    the scores. Block masks are cached per (Tq, Tk, window, device).
  - sdpa: everything else: full-context causal calls ("L" layers, where SDPA's flash kernel is as good as
    it gets), single-token decode (the keys are cropped to the window, no mask), rows of a continuously
    batched cache at different positions (one explicit mask), and every call on CPU / MPS.
`set_impl("fa3" | "flex" | "sdpa" | None)` forces a choice (tests, benchmarks); "flex" is allowed on CPU,
where FlexAttention runs eagerly (slow, and forward only on CPU in current PyTorch), for parity tests.
Decode stays on SDPA even then.

Nothing here imports torch._dynamo or FlexAttention at import time (both cost seconds); they are imported
on the first call that needs them.

Tests: python -m pytest tests/test_attention_fallback.py -q            (flex parity on CPU: -m slow)
"""

import logging
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

log = logging.getLogger("nanochat.flash_attention")

# FA3 builds, by GPU generation. Hopper (SM 9.x) has its own build; the community build covers Ampere
# (sm80/86) and Ada (sm89). Anything else (e.g. Blackwell sm100) falls back to SDPA.
HOPPER_FA3_REPO = "varunneal/flash-attention-3"
COMMUNITY_FA3_REPO = "kernels-community/flash-attn3"

_fa3 = None  # the loaded flash_attn_interface module, or None
_fa3_reason = None  # why FA3 is (not) available; None until the first load attempt
_override_impl = None  # None (automatic), "fa3", "flex" or "sdpa"
IMPLS = ("fa3", "flex", "sdpa")


# -----------------------------------------------------------------------------
# Loading FA3 (lazy, once)


def _load_fa3():
    """Try once to load FA3; remember the module (or None) and a one-line reason. Returns the module."""
    global _fa3, _fa3_reason
    if _fa3_reason is not None:
        return _fa3
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
            # Hopper tries its own build first, then the community one, whose Torch stable-ABI build loads on
            # any torch >= 2.9 where per-version builds lag behind new torch releases (README, Flash Attention 3).
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
    return module


def has_fa3():
    """True when FA3 loaded on this machine (triggers the one-time load)."""
    return _load_fa3() is not None


def fa3_status():
    """(available, reason) for startup logs: whether FA3 loaded and why (not)."""
    available = has_fa3()
    return available, _fa3_reason


def set_impl(impl):
    """Force the implementation: "fa3" (raises if FA3 can't load), "flex", "sdpa", or None for automatic.

    "flex" sends every call but single-token decode (and ragged cache rows) to FlexAttention, on any device.
    """
    global _override_impl
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"attention implementation must be 'fa3', 'flex', 'sdpa' or None, got {impl!r}")
    if impl == "fa3" and not has_fa3():
        raise RuntimeError(f"FA3 was requested but is not available: {_fa3_reason}")
    _override_impl = impl


def attention_plan(device_type, dtype):
    """(impl, reason): the kernel that windowed attention of `dtype` tensors on `device_type` runs, and why.

    impl is "fa3", "flex" (sliding windows and masked prefill; full-context layers stay on SDPA) or
    "sdpa". Loads FA3 on CUDA, so call it before torch.compile sees the model.
    """
    if _override_impl is not None and (_override_impl != "fa3" or device_type == "cuda"):
        return _override_impl, f"forced with set_impl({_override_impl!r})"
    if device_type != "cuda":
        return "sdpa", f"no FA3 or compiled FlexAttention on {device_type}"
    available, reason = fa3_status()
    if available and dtype == torch.bfloat16:
        return "fa3", reason
    why = reason if not available else f"FA3 is loaded but the compute dtype is {dtype}, and FA3 runs only in bf16"
    return "flex", why


def use_fa3(dtype=None):
    """Whether attention on tensors of `dtype` (default: the global compute dtype) goes to FA3."""
    if _override_impl is not None:
        return _override_impl == "fa3"
    if dtype is None:
        from nanochat.common import get_compute_dtype

        dtype = get_compute_dtype()[0]
    # FA3 here supports bf16 (and fp8) only; fp16/fp32 activations go to SDPA.
    return dtype == torch.bfloat16 and has_fa3()


def _fa3_for(q):
    """The FA3 module if this call should use it, else None."""
    if _override_impl in ("sdpa", "flex") or not q.is_cuda:
        return None
    if _fa3_reason is None:
        # Only the very first call loads. Training scripts load it before torch.compile sees the model
        # (loop.log_attention_path), so compiled graphs only read the globals set here.
        _load_fa3()
    if _override_impl == "fa3" or q.dtype == torch.bfloat16:
        return _fa3
    return None


def __getattr__(name):
    # HAS_FA3 / USE_FA3 read like module constants but are resolved on access, so import loads nothing.
    if name == "HAS_FA3":
        return has_fa3()
    if name == "USE_FA3":
        return use_fa3()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _needs_mask(Tq, Tk, window):
    """True when SDPA could run this call only with an explicit (Tq, Tk) mask (see _sdpa_math): a window
    shorter than the sequence, or queries that are not all of the keys; single-token decode needs none."""
    if Tq == 1:
        return False
    return not ((window < 0 or window >= Tq) and Tq == Tk)


def _choose(device, Tq, Tk, window):
    """The kernel ("flex" or "sdpa") for a call FA3 did not take: Tq queries on `device` against Tk keys."""
    if Tq == 1 or _override_impl == "sdpa":
        return "sdpa"
    if _override_impl == "flex":
        return "flex"
    return "flex" if device.type == "cuda" and _needs_mask(Tq, Tk, window) else "sdpa"


# -----------------------------------------------------------------------------
# FlexAttention path


_compiled_flex = None  # torch.compile(flex_attention), created on the first CUDA call
_block_masks = {}  # (Tq, Tk, window, device) -> BlockMask, built outside compiled graphs
_MAX_BLOCK_MASKS = 64  # inference sees a new (Tq, Tk) per prompt length: keep the cache bounded


def _window_mask_mod(Tq, Tk, window):
    """FlexAttention mask_mod: query q_idx sits at absolute position Tk - Tq + q_idx and sees key kv_idx when
    kv_idx <= its position and, with a window (w >= 0), position - kv_idx <= w."""
    offset = Tk - Tq

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    def windowed(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        return (kv_idx <= pos) & (pos - kv_idx <= window)

    return causal if window < 0 else windowed


def _make_block_mask(Tq, Tk, window, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_window_mask_mod(Tq, Tk, window), None, None, Tq, Tk, device=device)


def _block_mask(Tq, Tk, window, device):
    """The BlockMask of a causal, left-windowed attention of the last Tq of Tk positions."""
    if not 0 <= window < Tk:
        window = -1  # a window covering every key is plain causal: one cache entry for -1, T, 2T...
    if torch.compiler.is_compiling():
        # Inside a compiled model the mask is built by the graph itself: a few elementwise kernels per
        # step, and no Python dict for the compiler to guard on.
        return _make_block_mask(Tq, Tk, window, device)
    key = (Tq, Tk, window, device)
    mask = _block_masks.get(key)
    if mask is None:
        if len(_block_masks) >= _MAX_BLOCK_MASKS:
            _block_masks.pop(next(iter(_block_masks)))  # the oldest entry
        mask = _block_masks[key] = _make_block_mask(Tq, Tk, window, device)
    return mask


def _flex_kernel(device):
    """flex_attention, compiled on CUDA (created once per process); eager elsewhere (CPU parity tests).
    Inside an already compiled model the plain function is traced into the model's graph."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        log.info("FlexAttention: compiling flex_attention for sliding-window attention (once per process)")
        # Default dynamic shapes: eager callers (evaluation, the Engine's prefill) bring a new length per
        # prompt, and a second length makes the compiler generalise instead of recompiling for each.
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _flex_attention(q, k, v, window_size, enable_gqa):
    """Causal attention on (B, H, T, D) tensors with a left window through FlexAttention; queries are the
    LAST Tq key positions. On CPU, reduced-precision inputs are attended in fp32 (see _sdpa_attention)."""
    if CPU_ATTENTION_IN_FP32 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return _flex_attention(q.float(), k.float(), v.float(), window_size, enable_gqa).to(q.dtype)
    block_mask = _block_mask(q.size(2), k.size(2), window_size[0], q.device)
    return _flex_kernel(q.device)(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _attend(q, k, v, window_size, enable_gqa):
    """Flex or SDPA on (B, H, T, D) tensors, by _choose."""
    if _choose(q.device, q.size(2), k.size(2), window_size[0]) == "flex":
        return _flex_attention(q, k, v, window_size, enable_gqa)
    return _sdpa_attention(q, k, v, window_size, enable_gqa)


# -----------------------------------------------------------------------------
# SDPA fallback


# PyTorch's fused CPU attention in bf16 rounds the softmax probabilities, and in backward the score
# gradients, to bf16 between its matmuls. That alone made d4 pretraining on CPU worse than fp32 (a loss
# spike near step 15 and a lagging curve, bench/bench_precision_cpu.py); the same attention computed in
# fp32 from the bf16 inputs (rounded once at the output) keeps the fp32 curve. On CUDA, FA3 and SDPA keep
# bf16 as the GPU recipe always has.
CPU_ATTENTION_IN_FP32 = True


def _attention_dtype(q):
    """The dtype attention of `q` is computed in (see CPU_ATTENTION_IN_FP32)."""
    if CPU_ATTENTION_IN_FP32 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return q.dtype


def _sdpa_attention(q, k, v, window_size, enable_gqa, mask=None):
    """Causal attention on (B, H, T, D) tensors with a left window; queries are the LAST Tq key positions.
    mask: an explicit (B, 1, Tq, Tk) mask that replaces causality and window: boolean (True = attend) or
    additive (0 / -inf, in the dtype attention is computed in).

    On CPU, reduced-precision inputs are attended in fp32 and the result is cast back (see above).
    """
    if _attention_dtype(q) != q.dtype:
        return _sdpa_math(q.float(), k.float(), v.float(), window_size, enable_gqa, mask).to(q.dtype)
    return _sdpa_math(q, k, v, window_size, enable_gqa, mask)


def _sdpa_math(q, k, v, window_size, enable_gqa, mask=None):
    """The SDPA cases (see _sdpa_attention), in the inputs' dtype.

    Three cases, cheapest first: plain causal (window covers everything and Tq == Tk: training with an
    "L" window), single-token decode (crop the keys to the window, no mask needed), and an explicit
    boolean mask for everything else (training with "S" windows, chunked prefill into a cache). A mask
    the caller built (rows of a KV cache at different positions) goes straight to SDPA.
    """
    if mask is not None:
        # A boolean mask goes in as an additive 0/-inf one: CPU SDPA takes that ~15% faster (decode, 16 rows x 300 keys).
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=enable_gqa)
    window = window_size[0]
    Tq, Tk = q.size(2), k.size(2)
    if (window < 0 or window >= Tq) and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if Tq == 1:
        if 0 <= window < Tk:
            start = max(0, Tk - (window + 1))
            k, v = k[:, :, start:], v[:, :, start:]
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=enable_gqa)
    row = (Tk - Tq) + torch.arange(Tq, device=q.device).unsqueeze(1)  # (Tq, 1) absolute query positions
    col = torch.arange(Tk, device=q.device).unsqueeze(0)  # (1, Tk)
    mask = col <= row
    if 0 <= window < Tk:
        mask = mask & (row - col <= window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def _check_causal(causal):
    if not causal:
        raise ValueError("only causal attention is implemented (pass causal=True)")


# -----------------------------------------------------------------------------
# Public API (FA3 signature, (B, T, H, D) layout)


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """Attention over a whole sequence. q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0.

    Returns (B, T, H, D) in q's dtype. window_size = (left, right) in FA3 convention; right must be 0.
    """
    _check_causal(causal)
    fa3 = _fa3_for(q)
    if fa3 is not None:
        return fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size)
    y = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size,
                enable_gqa=q.size(2) != k.size(2))  # (B, H, T, D)
    return y.transpose(1, 2)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                            window_size=(-1, -1), cache_pos=None):
    """Attention of new queries against a KV cache, after writing the new keys/values into it in place.

    q: (B, Tn, H, D); k_cache, v_cache: (B, T_max, Hkv, D); k, v: (B, Tn, Hkv, D) or None;
    cache_seqlens: (B,) int32, the positions already filled in each row. Rows may hold different numbers
    of positions (a continuously batched cache): row b's new keys go to cache_seqlens[b] onwards and its
    queries see only its own keys, as FA3 does.
    cache_pos: optional host-side copy of cache_seqlens, an int when every row holds that many positions
    or a list of per-row ints; the SDPA path uses it to avoid a device sync per layer (FA3 reads
    cache_seqlens on the device and ignores it).
    """
    _check_causal(causal)
    fa3 = _fa3_for(q)
    if fa3 is not None:
        return fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                           causal=causal, window_size=window_size)
    if k_cache.dtype != q.dtype:
        raise ValueError(f"KV cache is {k_cache.dtype} but the queries are {q.dtype}; allocate the cache in the "
                         "model's compute dtype (model.compute_dtype)")
    if cache_pos is None:
        lengths = cache_seqlens.tolist()
        cache_pos = lengths[0] if len(set(lengths)) == 1 else lengths
    if isinstance(cache_pos, (list, tuple)):
        if len(set(cache_pos)) > 1:
            return _kvcache_ragged(q, k_cache, v_cache, k, v, cache_seqlens, cache_pos, window_size)
        cache_pos = cache_pos[0]
    pos = int(cache_pos)
    end = pos
    if k is not None:
        end = pos + k.size(1)
        _check_room(pos, k.size(1), k_cache.size(1))
        k_cache[:, pos:end] = k
        v_cache[:, pos:end] = v
    # Without new keys the queries are taken to be the last q.size(1) cached positions.
    k_full, v_full = k_cache[:, :end], v_cache[:, :end]
    y = _attend(q.transpose(1, 2), k_full.transpose(1, 2), v_full.transpose(1, 2), window_size,
                enable_gqa=q.size(2) != k_cache.size(2))
    return y.transpose(1, 2)


def _check_room(cached, new, capacity):
    if cached + new > capacity:
        raise RuntimeError(f"KV cache overflow: {cached} cached + {new} new positions > capacity {capacity}; "
                           "allocate the cache with room for the prompt plus every generated token")


def _kvcache_ragged(q, k_cache, v_cache, k, v, cache_seqlens, lengths, window_size):
    """flash_attn_with_kvcache's SDPA path when rows hold different numbers of positions (host `lengths`).

    Each row writes its new keys at its own length; the keys are the union of every row's [0, end) (cropped
    on the left to what the widest window needs), and one (B, 1, Tn, Tk) mask keeps, per row, the keys up to
    each query's own position and within its window, so a row never sees another row's stale positions.
    """
    B, Tn = q.size(0), q.size(1)
    if len(lengths) != B:
        raise ValueError(f"cache_pos lists {len(lengths)} row lengths for a batch of {B} rows")
    new = 0 if k is None else k.size(1)
    if new:
        _check_room(max(lengths), new, k_cache.size(1))
    window = window_size[0]
    start, end, qpos, bias = _ragged_mask(cache_seqlens, tuple(lengths), new, Tn, window, _attention_dtype(q), q.device)
    if new:
        rows = torch.arange(B, device=q.device).unsqueeze(1)  # (B, 1)
        k_cache[rows, qpos] = k  # (B, Tn, Hkv, D) scattered to each row's own positions
        v_cache[rows, qpos] = v
    y = _sdpa_attention(q.transpose(1, 2), k_cache[:, start:end].transpose(1, 2), v_cache[:, start:end].transpose(1, 2),
                        window_size, enable_gqa=q.size(2) != k_cache.size(2), mask=bias)
    return y.transpose(1, 2)


_last_ragged_mask = None  # (key, value) of the last _ragged_mask call: every layer of a step asks for the same one


def _ragged_mask(cache_seqlens, lengths, new, Tn, window, dtype, device):
    """(start, end, qpos, bias) for _kvcache_ragged: keys [start, end) of the cache, the (B, Tn) absolute position
    of each query, and the (B, 1, Tn, end - start) additive mask (0 where a query sees a key, -inf elsewhere).
    The result depends only on the rows' lengths, so it is built once per decode step, not once per layer."""
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
    keys = torch.arange(start, end, device=device)  # (Tk,) absolute key positions
    visible = keys <= qpos.unsqueeze(-1)  # (B, Tn, Tk): causal, and nothing past the row's own end
    if window >= 0:
        visible &= qpos.unsqueeze(-1) - keys <= window
    bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf")).unsqueeze(1)
    value = (start, end, qpos, bias)
    _last_ragged_mask = (key, value)
    return value


flash_attn = SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache)
