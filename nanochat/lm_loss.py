"""
The language-model loss: lm_head, logit soft-capping and cross-entropy, as one function.

    from nanochat.lm_loss import lm_loss
    loss = lm_loss(x, lm_head, targets, vocab_size)          # x: (N, d) normalised; targets (N,), -1 = ignored

Two implementations compute the same numbers:
* `reference_lm_loss`: full fp32 (N, V) logits, soft-capped, then F.cross_entropy. fp32 models, CUDA and
  compiled models use it (torch.compile fuses it) and so does any lm_head that is not a plain weight-casting
  Linear (an FP8 layer, say).
* `chunked_lm_loss`, the bf16 CPU kernel: the lm_head matmul fused with the loss, never holding fp32 (N, V) logits,
  with the gradients computed in the forward pass chunk by chunk. On CPU the (N, V) fp32 passes cost
  more than the matmuls; this path cuts that traffic several-fold.

A mean over zero valid targets (a fully masked batch, e.g. an SFT batch of padding) is 0, not NaN.

Tests: python -m pytest tests/test_lm_loss.py -q
"""

import math
import threading

import torch
import torch.nn.functional as F

SOFTCAP = 15.0  # logits = 15·tanh(logits/15); 20 was tried (2026-03-02) and reverted
# Chunked loss (CPU): rows per lm_head matmul block, and per fp32 softcap/softmax sub-chunk (cache-sized).
LOSS_BLOCK_BYTES = 32 << 20
LOSS_SUBCHUNK_BYTES = 1 << 20



def softcap(logits, cap=SOFTCAP):
    return cap * torch.tanh(logits / cap)


def reference_lm_loss(x, lm_head, targets, vocab_size, reduction="mean"):
    """The plain path: full fp32 logits (N, V), soft-capped, then cross-entropy. x: (N, d)."""
    logits = softcap(lm_head(x)[..., :vocab_size].float())
    if reduction != "mean":
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)
    total = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
    return total / (targets != -1).sum().clamp_min(1)


def _workspace(name, shape, dtype, device):
    """A reusable scratch tensor for the chunked loss, kept per (name, dtype, device, thread).

    Large CPU allocations go straight to mmap and come back as fresh pages every step: the page faults and
    the kernel's zeroing of the (N, V) gradient buffer cost as much as the math on it. Reusing the storage
    keeps those pages mapped. Only scratch lives here: nothing returned to the caller aliases a workspace.
    """
    key = (name, dtype, str(device), threading.get_ident())
    numel = math.prod(shape)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACES[key] = buf
    return buf[:numel].view(shape)


_WORKSPACES = {}


def _chunked_rows(x, w, targets, cap, want_grad):
    """Per-row soft-capped CE of x @ w.T without ever holding fp32 (N, V) logits.

    x: (N, d), w: (V, d) in the compute dtype; targets (N,) with -1 = ignored.
    Returns (row_losses fp32 (N,), dlogits (N, V) in x.dtype or None), dlogits being the gradient of
    sum(row_losses) w.r.t. the un-capped logits. Numerics match `reference_lm_loss`: the logits are
    rounded to the compute dtype as lm_head's matmul would, then everything is fp32. dlogits is a
    reused workspace: consume it before the next call.

    Blocks of rows go through one matmul into a reused buffer; the fp32 work then runs on sub-chunks
    small enough to stay in L2, in as few passes as possible (each pass over the V columns is the cost):
    z = tanh(l/cap) (one pass from the compute dtype), e = exp(cap·z) (no max-subtraction needed:
    cap·z <= cap), the row sums, then the gradient (softmax - onehot)·(1 - z²) written straight into
    the compute-dtype dlogits.
    """
    N, V = x.size(0), w.size(0)
    block = max(1, min(N, LOSS_BLOCK_BYTES // (V * x.element_size())))
    sub = max(1, min(block, LOSS_SUBCHUNK_BYTES // (V * 4)))
    valid = targets != -1
    safe_targets = targets.clamp_min(0).unsqueeze(1)  # ignored rows read column 0 and are masked out
    losses = torch.empty(N, dtype=torch.float32, device=x.device)
    dlogits = _workspace("dlogits", (N, V), x.dtype, x.device) if want_grad else None
    w_t = w.T.contiguous()  # (d, V): the matmul with out= wants plain row-major operands
    logits_buf = _workspace("logits", (block, V), x.dtype, x.device)
    z_buf = _workspace("z", (sub, V), torch.float32, x.device)
    e_buf = _workspace("e", (sub, V), torch.float32, x.device)
    for b0 in range(0, N, block):
        b1 = min(N, b0 + block)
        logits = torch.mm(x[b0:b1], w_t, out=logits_buf[:b1 - b0])  # (rows, V) compute dtype
        for s0 in range(b0, b1, sub):
            s1 = min(b1, s0 + sub)
            z, e = z_buf[:s1 - s0], e_buf[:s1 - s0]
            # Same-dtype ops only: a mixed bf16/fp32 op (mul with out=) converts through a temporary, 2x slower.
            z.copy_(logits[s0 - b0:s1 - b0]).mul_(1.0 / cap).tanh_()  # the capped logits are cap·z
            torch.mul(z, cap, out=e).exp_()  # e^(cap·z) <= e^cap: no overflow, no max pass
            total = e.sum(1, keepdim=True)  # (r, 1)
            tgt, ok = safe_targets[s0:s1], valid[s0:s1]
            z_t = z.gather(1, tgt)  # (r, 1)
            losses[s0:s1] = torch.where(ok, total.log().squeeze(1) - cap * z_t.squeeze(1), 0.0)
            if want_grad:
                # e·(1 - z²), minus total·(1 - z_t²) at the target, then / total: (softmax - onehot)·dcap/dl.
                torch.ops.aten.tanh_backward.grad_input(e, z, grad_input=e)
                e.scatter_add_(1, tgt, -total * (1 - z_t * z_t))
                dlogits[s0:s1] = e.mul_(ok.unsqueeze(1) / total)  # ignored rows: 0; rounded once
    return losses, dlogits


class _ChunkedLMLoss(torch.autograd.Function):
    """Mean/sum soft-capped CE with the lm_head matmul fused in. The gradients are computed in the
    forward pass, chunk by chunk (the logits are needed there anyway), and only scaled in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, cap, reduction):
        w = weight.to(x.dtype)[:vocab_size]  # padded vocab rows never produce logits: zero grad
        losses, dlogits = _chunked_rows(x, w, targets, cap, want_grad=True)
        grad_x = dlogits @ w  # (N, d)
        grad_w = torch.empty_like(weight)
        # (V, d) from (d, N) @ (N, V), with x.T made contiguous (it is small): the fastest orientation on CPU.
        grad_w[:vocab_size] = (x.T.contiguous() @ dlogits).T
        grad_w[vocab_size:] = 0.0
        count = (targets != -1).sum().clamp_min(1) if reduction == "mean" else None
        ctx.save_for_backward(grad_x, grad_w, count)
        ctx.reduction = reduction
        total = losses.sum()
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_out / count if ctx.reduction == "mean" else grad_out
        return grad_x * scale.to(grad_x.dtype), grad_w * scale, None, None, None, None


def chunked_lm_loss(x, lm_head, targets, vocab_size, reduction):
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or lm_head.weight.requires_grad)
    if not needs_grad:
        with torch.no_grad():
            losses, _ = _chunked_rows(x, lm_head.weight.to(x.dtype)[:vocab_size], targets, SOFTCAP, want_grad=False)
        if reduction == "none":
            return losses
        return losses.sum() / (targets != -1).sum().clamp_min(1) if reduction == "mean" else losses.sum()
    if reduction == "none":  # per-token grads can't be pre-summed into a weight gradient
        return reference_lm_loss(x, lm_head, targets, vocab_size, reduction)
    return _ChunkedLMLoss.apply(x, lm_head.weight, targets, vocab_size, SOFTCAP, reduction)


def lm_loss(x, lm_head, targets, vocab_size, reduction="mean"):
    """Cross-entropy of soft-capped logits, lm_head included. x: (N, d) normalised; targets: (N,).

    Low-precision (bf16) CPU/MPS runs take the chunked path (no fp32 (N, V) tensor, far less memory traffic) when
    lm_head is a weight-casting Linear (`casts_weight`); fp32 and CUDA keep the plain path (torch.compile fuses it
    on CUDA), and so does an FP8-converted lm_head.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    # Under torch.compile the plain path is traced and fused; the hand-chunked loops with reused buffers aren't
    # traceable. (Checking is_compiling() instead of decorating with torch.compiler.disable keeps torch._dynamo,
    # seconds of imports, out of every script that never compiles.)
    # fp32 takes the plain path too: it rounds exactly as the reference does, so an fp32 CPU run follows the reference
    # bit for bit. The chunked kernel's different last bits (only that) grew into a 1.5% val-bpb gap by step 100 of a
    # d4 run, through the chaotic first steps (docs/performance.md, "Same curve as upstream").
    if (x.is_cuda or x.dtype == torch.float32 or torch.compiler.is_compiling()
            or not getattr(lm_head, "casts_weight", False) or lm_head.bias is not None):
        return reference_lm_loss(x, lm_head, targets, vocab_size, reduction)
    return chunked_lm_loss(x, lm_head, targets, vocab_size, reduction)
