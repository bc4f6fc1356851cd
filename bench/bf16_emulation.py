"""
bf16 numerics on a CPU that has no native bf16 matmul, for quality experiments only.

On CPUs without AVX512-BF16/AMX, PyTorch's bf16 matmuls fall back to a slow path (about 200x slower than
fp32 on an AMD EPYC Zen 2), which makes a bf16 training run impossible to finish. The numbers a native
bf16 matmul produces are easy to reproduce, though: it multiplies bf16 inputs exactly, accumulates in
fp32 and rounds the result to bf16 once. `EmulatedBF16Matmuls` intercepts every matmul-like aten op
whose inputs are bf16, runs it in fp32 on the (exactly upcast) inputs and rounds each output to the dtype
the real op would have returned. Everything else (elementwise ops, norms, casts, the optimizer's bf16
storage) runs natively in bf16, as in a real run. Attention (the fused CPU flash kernel, forward and
backward) is computed in fp32 from bf16 inputs and rounded once: slightly more precise than the real
kernel, which also rounds the softmax probabilities to bf16 before multiplying them with V; pass
attention=False to run the real kernel instead (about 4x the fp32 attention cost on such a CPU).

    from bench.bf16_emulation import EmulatedBF16Matmuls
    with EmulatedBF16Matmuls() as emu:
        ...  # bf16 training
    print(emu.counts)   # which ops were emulated, how often

Summation order differs from a real bf16 kernel, so results match a native run statistically (the same
loss curve within run-to-run noise), not bit for bit. Speed numbers under emulation mean nothing.
"""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

# Matmul-like ops: the ones a bf16 training step of the GPT reaches on CPU (F.linear decomposes into
# mm/addmm/bmm below autograd; Polar Express uses bmm/baddbmm; the chunked loss uses mm with out=).
_MATMULS = {
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.addbmm.default,
    aten.mv.default, aten.addmv.default, aten.dot.default,
}
_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}
# out= variants: computed through the functional op, then copied (rounded) into `out`.
_OUT_VARIANTS = {aten.mm.out: aten.mm.default, aten.addmm.out: aten.addmm.default, aten.bmm.out: aten.bmm.default,
                 aten.baddbmm.out: aten.baddbmm.default}
# Names that would mean a bf16 matmul slipped past the table above.
_SUSPECT = ("mm", "matmul", "attention", "conv", "linear", "einsum", "dot")


def _is_bf16(t):
    return isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16


def _up(t):
    return t.float() if _is_bf16(t) else t


def _meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) else t


class EmulatedBF16Matmuls(TorchDispatchMode):
    """Run bf16 matmuls (and CPU flash attention) in fp32 on exact bf16 inputs, rounding outputs to bf16.

    attention=False leaves the fused attention kernel native: its real bf16 numerics (it also rounds the
    softmax probabilities and, in backward, the score gradients to bf16), at ~4x the fp32 cost here.
    """

    def __init__(self, attention=True):
        super().__init__()
        self.emulated = _MATMULS | (_ATTENTION if attention else set())
        self.counts = Counter()
        self.missed = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = list(args) + list(kwargs.values())
        if not any(_is_bf16(a) for a in flat):
            return func(*args, **kwargs)
        if func in _OUT_VARIANTS:
            out = kwargs["out"]
            rest = {k: v for k, v in kwargs.items() if k != "out"}
            result = _OUT_VARIANTS[func](*tree_map(_up, args), **tree_map(_up, rest))
            out.copy_(result)
            self.counts[str(func)] += 1
            return out
        if func in self.emulated:
            # The dtypes the real op returns, from a shape-only run on the meta device.
            expected = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))
            result = func(*tree_map(_up, args), **tree_map(_up, kwargs))
            self.counts[str(func)] += 1
            if isinstance(result, torch.Tensor):
                return result.to(expected.dtype)
            return type(result)(r.to(e.dtype) if isinstance(r, torch.Tensor) else r for r, e in zip(result, expected))
        name = str(func)
        if func not in _ATTENTION and any(s in name for s in _SUSPECT):
            self.missed[name] += 1
        return func(*args, **kwargs)
