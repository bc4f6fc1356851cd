"""The LM loss (nanochat/lm_loss.py): the chunked CPU kernel against the plain fp32 reference."""

import pytest
import torch

from nanochat import lm_loss as lm_loss_module
from nanochat.gpt import Linear
from nanochat.lm_loss import chunked_lm_loss, lm_loss, reference_lm_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_matches_reference(dtype, reduction, monkeypatch):
    # Small chunk sizes so the 3 x 40 rows run through several blocks and sub-chunks.
    monkeypatch.setattr(lm_loss_module, "LOSS_BLOCK_BYTES", 16 * 1000 * dtype.itemsize)
    monkeypatch.setattr(lm_loss_module, "LOSS_SUBCHUNK_BYTES", 5 * 1000 * 4)
    gen = torch.Generator().manual_seed(4)
    head = Linear(32, 1024, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1024, 32, generator=gen))  # logits well beyond the cap
    targets = torch.randint(0, 1000, (120,), generator=gen)
    targets[::7] = -1
    x_ref = torch.randn(120, 32, generator=gen).to(dtype).requires_grad_()
    x_new = x_ref.detach().clone().requires_grad_()
    ref = reference_lm_loss(x_ref, head, targets, 1000, reduction)
    ref.backward()
    gx_ref, gw_ref = x_ref.grad, head.weight.grad.clone()
    head.weight.grad = None
    new = chunked_lm_loss(x_new, head, targets, 1000, reduction)
    new.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert new.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(x_new.grad.float(), gx_ref.float(), rtol=tol, atol=tol * gx_ref.abs().max().item())
    assert torch.allclose(head.weight.grad, gw_ref, rtol=tol, atol=tol * gw_ref.abs().max().item())
    assert head.weight.grad[1000:].abs().max().item() == 0.0  # padded rows
    with torch.no_grad():
        rows_ref = reference_lm_loss(x_ref, head, targets, 1000, "none")
        rows_new = chunked_lm_loss(x_new, head, targets, 1000, "none")
    assert torch.allclose(rows_new, rows_ref, atol=1e-4)


def test_per_token_loss_with_grad_uses_the_plain_path():
    gen = torch.Generator().manual_seed(5)
    head = Linear(16, 64, bias=False)
    x = torch.randn(10, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 64, (10,), generator=gen)
    rows = lm_loss(x, head, targets, 64, "none")
    weights = torch.linspace(-1, 1, 10)
    (rows * weights).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (reference_lm_loss(x2, head, targets, 64, "none") * weights).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    with pytest.raises(ValueError, match="loss_reduction"):
        lm_loss(x, head, targets, 64, "avg")


@pytest.mark.parametrize("chunked", [True, False])
def test_fully_masked_mean_is_zero_with_zero_grads(chunked):
    """A micro-batch whose targets are all ignored (SFT padding) must give 0, not NaN, and no gradient."""
    head = Linear(16, 64, bias=False)
    x = torch.randn(12, 16, requires_grad=True)
    targets = torch.full((12,), -1)
    loss = chunked_lm_loss(x, head, targets, 64, "mean") if chunked else reference_lm_loss(x, head, targets, 64)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(head.weight.grad) == 0


def test_fp32_takes_the_plain_path_and_bf16_the_chunked_one(monkeypatch):
    """fp32 must round exactly as the reference (plain) loss does, gradients included; bf16 on CPU is chunked."""
    calls = []
    chunked = lm_loss_module.chunked_lm_loss
    monkeypatch.setattr(lm_loss_module, "chunked_lm_loss", lambda *a: calls.append(a[0].dtype) or chunked(*a))
    gen = torch.Generator().manual_seed(6)
    head = Linear(32, 512, bias=False)
    targets = torch.randint(0, 500, (64,), generator=gen)
    x = torch.randn(64, 32, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    loss = lm_loss(x, head, targets, 500)
    loss.backward()
    grad_w = head.weight.grad.clone()
    head.weight.grad = None
    ref = reference_lm_loss(x_ref, head, targets, 500)
    ref.backward()
    assert torch.equal(loss, ref) and torch.equal(x.grad, x_ref.grad) and torch.equal(grad_w, head.weight.grad)
    assert calls == []
    lm_loss(x.detach().bfloat16().requires_grad_(), head, targets, 500)
    assert calls == [torch.bfloat16]
