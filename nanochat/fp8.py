"""
Minimal FP8 training for the big matmuls: tensorwise dynamic scaling with torch._scaled_mm, e4m3 forward and
e5m2 gradients. Needs CUDA SM >= 8.9 (Ada, Hopper); pays off only compiled at large widths (upstream: about
1.17x tok/s at d26, slower at d12).

    from nanochat import fp8
    converted, skipped = fp8.convert_to_float8_training(model)        # before torch.compile
    with fp8.disable_fp8(model):                                      # eval / sampling in bf16
        ...

Tests: python -m pytest tests/test_fp8.py -q      (the numeric test needs a GPU: -m gpu)
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

SUPPORTED_RECIPES = ("tensorwise",)
MIN_CAPABILITY = (8, 9)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


# -----------------------------------------------------------------------------
# Quantisation and the fp8 matmul


@torch.no_grad()
def _to_fp8(x, dtype):
    """(x_fp8, inv_scale) with x ≈ x_fp8.float() * inv_scale; max|x| maps to the format's largest finite value."""
    fp8_max = FP8_MAX[dtype]
    amax = x.abs().max().float()
    scale = (fp8_max / amax.double().clamp(min=1e-12)).float()  # in float64: a tiny amax can't overflow it
    x_fp8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)  # a plain cast turns out-of-range values into NaN
    return x_fp8, scale.reciprocal()


def _col_major(x):
    """Same values, column-major storage: _scaled_mm wants its second operand that way."""
    return x.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """out = input @ weight.T with both operands in e4m3; gradients through e5m2. input: (N, in) 2-D."""

    @staticmethod
    def forward(ctx, input, weight):
        in_fp8, in_inv = _to_fp8(input, torch.float8_e4m3fn)
        w_fp8, w_inv = _to_fp8(weight, torch.float8_e4m3fn)  # the fp32 master weight, quantised directly
        ctx.save_for_backward(in_fp8, in_inv, w_fp8, w_inv)  # fp8, not bf16: most of the memory saving
        # w_fp8 is (out, in) row-major, so its transpose is already the column-major operand.
        return torch._scaled_mm(in_fp8, w_fp8.t(), scale_a=in_inv, scale_b=w_inv, out_dtype=input.dtype,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        in_fp8, in_inv, w_fp8, w_inv = ctx.saved_tensors
        go_fp8, go_inv = _to_fp8(grad_out, torch.float8_e5m2)
        # grad_input (N, in) = grad_out (N, out) @ weight (out, in)
        grad_input = torch._scaled_mm(go_fp8, _col_major(w_fp8), scale_a=go_inv, scale_b=w_inv,
                                      out_dtype=grad_out.dtype, use_fast_accum=False)
        # grad_weight (out, in) = grad_out.T (out, N) @ input (N, in); autograd casts it to the fp32 master dtype
        grad_weight = torch._scaled_mm(go_fp8.t().contiguous(), _col_major(in_fp8), scale_a=go_inv, scale_b=in_inv,
                                       out_dtype=grad_out.dtype, use_fast_accum=False)
        return grad_input, grad_weight


class Float8Linear(nn.Linear):
    """Drop-in for nanochat's Linear whose matmul runs in FP8 (CUDA SM >= 8.9 only)."""

    compute_dtype = torch.bfloat16

    def forward(self, x):
        if not x.is_cuda:
            raise RuntimeError(f"Float8Linear got a {x.device.type} tensor; {fp8_requirement()}")
        x = x.to(self.compute_dtype)
        out = _Float8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight)
        out = out.reshape(*x.shape[:-1], out.size(-1))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @classmethod
    def from_float(cls, mod, compute_dtype=torch.bfloat16):
        """Wrap an existing Linear without copying: the shell is built on meta and takes over its Parameters."""
        with torch.device("meta"):
            new = cls(mod.in_features, mod.out_features, bias=False)
        new.weight = mod.weight
        new.bias = mod.bias
        new.compute_dtype = compute_dtype
        return new


# -----------------------------------------------------------------------------
# Configuration and conversion


@dataclass(frozen=True)
class Float8LinearConfig:
    recipe: str = "tensorwise"

    @classmethod
    def from_recipe_name(cls, name):
        """Only "tensorwise" exists here (rowwise was slower in upstream's measurements anyway)."""
        if name not in SUPPORTED_RECIPES:
            raise ValueError(f"unsupported FP8 recipe {name!r}: supported recipes are {', '.join(SUPPORTED_RECIPES)}")
        return cls(recipe=name)


def fp8_requirement():
    return f"FP8 training needs a CUDA GPU with compute capability SM >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada or Hopper)"


def check_fp8_support(device):
    """Raise RuntimeError unless `device` can run torch._scaled_mm in FP8."""
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"{fp8_requirement()}; this run is on {device.type}. Drop --fp8.")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"{fp8_requirement()}; {name} is SM {capability[0]}.{capability[1]}. Drop --fp8.")


def default_module_filter(module, fqn):
    """Convert a Linear when both dims are multiples of 16 and the smaller is >= 128: every attention/MLP matrix
    and lm_head, but not the tiny gates (ve_gate, smear_gate), where fp8 would only add quantisation noise."""
    return (isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and min(module.in_features, module.out_features) >= 128)


def convert_to_float8_training(module, *, config=None, module_filter_fn=None, recipe=None, compute_dtype=None):
    """Swap the nn.Linears that module_filter_fn(module, fqn) keeps (default `default_module_filter`) for
    Float8Linear in place; returns (converted, skipped). Refuses parameters off an SM >= 8.9 GPU, except meta."""
    # torch.compile traces the FP8 matmul as one opaque node. Registered here rather than with a decorator at
    # import, which would load torch._dynamo (seconds of imports) into every script that imports this module.
    import torch._dynamo

    torch._dynamo.allow_in_graph(_Float8Matmul)
    if config is None:
        config = Float8LinearConfig.from_recipe_name(recipe or "tensorwise")
    elif recipe is not None and recipe != config.recipe:
        raise ValueError(f"recipe={recipe!r} contradicts config.recipe={config.recipe!r}")
    else:
        Float8LinearConfig.from_recipe_name(config.recipe)
    devices = {p.device for p in module.parameters() if p.device.type != "meta"}
    for device in devices:
        check_fp8_support(device)
    if compute_dtype is None:
        compute_dtype = getattr(module, "compute_dtype", torch.bfloat16)
    keep = module_filter_fn or default_module_filter
    counts = [0, 0]

    def visit(parent, prefix):
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            visit(child, fqn)
            if isinstance(child, nn.Linear) and not isinstance(child, Float8Linear):
                if keep(child, fqn):
                    setattr(parent, name, Float8Linear.from_float(child, compute_dtype))
                    counts[0] += 1
                else:
                    counts[1] += 1

    visit(module, "")
    return counts[0], counts[1]


@contextlib.contextmanager
def disable_fp8(model):
    """Within the block, plain Linears (sharing the weights) replace every Float8Linear: eval and sampling
    run in the compute dtype."""
    from nanochat.gpt import Linear

    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Float8Linear):
                with torch.device("meta"):
                    plain = Linear(child.in_features, child.out_features, bias=False)
                plain.weight = child.weight
                plain.bias = child.bias
                setattr(parent, name, plain)
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
