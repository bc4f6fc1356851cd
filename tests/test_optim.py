"""
Unit tests for nanochat/optim.py (MuonAdamW) on one process, CPU, eager kernels.

    python -m pytest tests/test_optim.py -q            # fast tests
    python -m pytest tests/test_optim.py -q -m slow    # torch.compile'd kernels on CPU vs eager
    python -m pytest tests/test_optim.py -q -m gpu     # the same on CUDA

The multi-process (gloo) parity tests are in tests/test_optim_distributed.py.
"""

import io
import math

import pytest
import torch

from nanochat import optim
from nanochat.optim import POLAR_EXPRESS_COEFFS, MuonAdamW, muon_eq, muon_lr_factor, normuon, polar_express

F32 = torch.float32


def adamw(params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    return dict(kind="adamw", params=list(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def muon(params, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0):
    return dict(kind="muon", params=list(params), lr=lr, momentum=momentum, ns_steps=ns_steps, beta2=beta2, weight_decay=weight_decay)


def param(*shape, dtype=F32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(*shape, generator=g) * scale).to(dtype))


def random_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def with_spectrum(m, n, sigmas, seed=0):
    """An (m, n) matrix whose singular values are exactly `sigmas` (length min(m, n))."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    return (U * sigmas) @ V.T


# -----------------------------------------------------------------------------
# AdamW


def test_adamw_matches_torch_adamw():
    """Two groups with different hyperparameters and a per-step LR schedule: 10 steps equal torch.optim.AdamW
    (decoupled WD, bias correction) to rtol 1e-5 / atol 1e-6, parameters and both moments."""
    ours = [param(64, 32, seed=1), param(48, seed=2), param(1, seed=3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hyper = [dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), dict(lr=0.003, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.0)]
    opt = MuonAdamW([adamw(ours[:1], **hyper[0]), adamw(ours[1:], **hyper[1])])
    ref_opt = torch.optim.AdamW([dict(params=ref[:1], **hyper[0]), dict(params=ref[1:], **hyper[1])], foreach=False)
    for step in range(10):
        random_grads(ours, seed=step)
        random_grads(ref, seed=step)
        for o in (opt, ref_opt):
            for group, h in zip(o.param_groups, hyper):
                group["lr"] = h["lr"] * (1 - 0.05 * step)
            o.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
        assert opt.state[p]["step"] == 10
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[r]["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"], rtol=1e-5, atol=1e-6)


def test_fp32_adamw_rounds_as_the_reference_does():
    """fp32 params on CPU: every step is bit-identical to the reference's order of operations with fp32 0-D
    hyperparameters (decay, both lerps, bias corrections, denominator, one add). Another order or PyTorch's fused
    kernel differs in the last bits, which the chaotic first steps of training grow into a different curve."""
    p = param(64, 32, seed=5)
    ref, m, v = p.detach().clone(), torch.zeros(64, 32), torch.zeros(64, 32)
    opt = MuonAdamW([adamw([p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    for step in range(1, 6):
        random_grads([p], seed=20 + step)
        lr, wd, beta1, beta2, eps, t = (torch.tensor(x, dtype=F32) for x in (0.01, 0.1, 0.8, 0.95, 1e-10, step))
        ref.mul_(1 - lr * wd)
        m.lerp_(p.grad, 1 - beta1)
        v.lerp_(p.grad.square(), 1 - beta2)
        ref.add_(m / ((v / (1 - beta2**t)).sqrt() + eps), alpha=-(lr / (1 - beta1**t)))
        opt.step()
        assert torch.equal(p.detach(), ref), f"step {step}"
    assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["exp_avg_sq"], v)


def test_adamw_bf16_storage_does_fp32_math_and_rounds_once():
    """A bf16 param (like wte on bf16 hardware) keeps bf16 moments; each step equals fp32 AdamW on the bf16 values,
    rounded to bf16 once at the end: at least 99% of elements bit-identical, the rest within one bf16 ulp (or
    1e-4 absolute near zero, where a one-ulp tie broken differently in an earlier step carries forward)."""
    p = param(64, 32, dtype=torch.bfloat16, seed=4)
    ref = torch.nn.Parameter(p.detach().float())
    opt = MuonAdamW([adamw([p])])
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(5):
        random_grads([p], seed=10 + step)
        ref.grad = p.grad.float()
        opt.step()
        ref_opt.step()
        with torch.no_grad():  # emulate bf16 storage for the reference: round param and moments every step
            ref.copy_(ref.bfloat16().float())
            for key in ("exp_avg", "exp_avg_sq"):
                ref_opt.state[ref][key].copy_(ref_opt.state[ref][key].bfloat16().float())
    state = opt.state[p]
    assert p.dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert (p.float() == ref).float().mean() > 0.99
    torch.testing.assert_close(p.float(), ref.detach(), rtol=2**-7, atol=1e-4)


# -----------------------------------------------------------------------------
# Muon building blocks


def test_polar_express_coefficients_are_exact():
    assert POLAR_EXPRESS_COEFFS == (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    )
    assert optim.POLAR_EXPRESS_NORM_MARGIN == 1.01


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48)])
def test_polar_express_singular_value_band(shape, dtype):
    """Inputs with condition number up to 100 come out with every singular value in [0.85, 1.15]
    (measured: about [0.86, 1.14] in fp32 and bf16; Polar Express's 5 polynomials leave a ±0.14 ripple)."""
    k = min(shape)
    mats = [
        with_spectrum(*shape, torch.logspace(0, -2, k), seed=0),  # condition number 100
        with_spectrum(*shape, torch.linspace(1, 0.5, k) * 7.0, seed=1),  # well conditioned, large scale
    ]
    if shape[0] != shape[1]:  # a rectangular Gaussian is well conditioned (a square one is not)
        mats.append(torch.randn(*shape, generator=torch.Generator().manual_seed(2)))
    stack = torch.stack(mats)
    sv = torch.linalg.svdvals(polar_express(stack.to(dtype)).float())
    assert sv.min() > 0.85 and sv.max() < 1.15, (sv.min().item(), sv.max().item())


def test_polar_express_rejects_more_steps_than_coefficients():
    with pytest.raises(ValueError, match="1..5"):
        polar_express(torch.randn(1, 4, 4), steps=6)


def test_muon_eq_equalises_row_norms():
    X = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 16)[:, None]
    X[1, 3] = 0.0  # an all-zero row must stay zero, not become NaN
    Y = muon_eq(X)
    rows = Y.norm(dim=-1)
    target = X.norm(dim=(-2, -1)) / math.sqrt(16)
    torch.testing.assert_close(rows[0], target[0].expand(16), rtol=1e-5, atol=0)
    assert torch.all(Y[1, 3] == 0)
    torch.testing.assert_close(torch.cat([rows[1, :3], rows[1, 4:]]), target[1].expand(15), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape, red_dim", [((2, 32, 16), -1), ((2, 16, 16), -1), ((2, 16, 32), -2)])
def test_normuon_equalises_rows_or_columns_and_keeps_frobenius(shape, red_dim):
    """Rows (tall/square) or columns (wide) come out with equal RMS, the Frobenius norm is unchanged, and the
    second moment is a plain EMA with no bias correction."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(*shape, generator=gen) * torch.rand(*shape[:-2], shape[-2] if red_dim == -1 else 1, shape[-1] if red_dim == -2 else 1, generator=gen)
    moment_shape = list(shape)
    moment_shape[red_dim] = 1
    S = torch.zeros(moment_shape)
    beta2 = torch.tensor(0.75)
    out = normuon(g, S, beta2, red_dim)
    torch.testing.assert_close(S, 0.25 * g.square().mean(dim=red_dim, keepdim=True))
    rms = out.square().mean(dim=red_dim)
    torch.testing.assert_close(rms, rms[..., :1].expand_as(rms), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), g.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    g2 = torch.randn(*shape, generator=gen)
    normuon(g2, S, beta2, red_dim)
    torch.testing.assert_close(S, 0.75 * 0.25 * g.square().mean(dim=red_dim, keepdim=True) + 0.25 * g2.square().mean(dim=red_dim, keepdim=True))


def test_muon_lr_factor():
    assert muon_lr_factor((3072, 768)) == 2.0  # c_fc, 4d x d
    assert muon_lr_factor((768, 3072)) == 1.0  # mlp.c_proj
    assert muon_lr_factor((768, 768)) == 1.0
    assert muon_lr_factor((6, 12)) == 1.0  # ve_gate


# -----------------------------------------------------------------------------
# Muon through the optimizer


def first_update(shape, lr=1.0, beta2=1.0, ortho_dtype=F32, seed=0):
    """-(update) of one Muon step from zero params with momentum 0 (the raw orthogonalised gradient)."""
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = MuonAdamW([muon([p], lr=lr, momentum=0.0, beta2=beta2)], ortho_dtype=ortho_dtype)
    random_grads([p], seed)
    opt.step()
    return -p.detach().float()


@pytest.mark.parametrize("ortho_dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_first_muon_update_is_near_semi_orthogonal(shape, ortho_dtype):
    """Spec check: singular values of the first update of a random grad, divided by their mean, have max/min < 4.
    Measured much tighter: every singular value within [0.8, 1.2] of the mean (fp32 and bf16 orthogonalisation).
    Muon+ makes the Frobenius norm exactly lr_eff * sqrt(min(m, n))."""
    update = first_update(shape, ortho_dtype=ortho_dtype)
    sv = torch.linalg.svdvals(update)
    sv = sv / sv.mean()
    assert sv.max() / sv.min() < 4
    assert sv.min() > 0.8 and sv.max() < 1.2, (sv.min().item(), sv.max().item())
    torch.testing.assert_close(update.norm(), torch.tensor(muon_lr_factor(shape) * math.sqrt(32)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("beta2", [1.0, 0.9])
def test_shape_lr_factor_scales_update_norm(beta2):
    """||update||_F = lr * sqrt(max(1, m/n)) * sqrt(min(m, n)): tall matrices step 2x (factor), wide/square 1x.
    NorMuon only redistributes within the matrix, so this holds for any beta2."""
    lr = 0.02
    for shape, expected in [((64, 16), 2 * 4), ((16, 64), 4), ((16, 16), 4)]:
        norm = first_update(shape, lr=lr, beta2=beta2).norm()
        torch.testing.assert_close(norm, torch.tensor(lr * expected), rtol=1e-5, atol=0)


def test_muon_nesterov_momentum_buffer():
    """M <- mu*M + (1-mu)*G (EMA form), kept per group in a (K, m, n) stack."""
    ps = [param(8, 4, seed=i) for i in range(2)]
    opt = MuonAdamW([muon(ps, momentum=0.9)], ortho_dtype=F32)
    random_grads(ps, seed=1)
    g1 = torch.stack([p.grad.clone() for p in ps])
    opt.step()
    buf = opt.state[ps[0]]["momentum_buffer"]
    assert buf.shape == (2, 8, 4) and opt.state[ps[0]]["second_momentum_buffer"].shape == (2, 8, 1)
    torch.testing.assert_close(buf, 0.1 * g1)
    random_grads(ps, seed=2)
    g2 = torch.stack([p.grad.clone() for p in ps])
    opt.step()
    torch.testing.assert_close(opt.state[ps[0]]["momentum_buffer"], 0.9 * 0.1 * g1 + 0.1 * g2)


def test_cautious_weight_decay_only_where_update_and_weight_agree():
    """P <- P - lr*g - lr*wd*P*[g*P >= 0]: where g and P disagree in sign the result equals the no-decay step bit
    for bit; where they agree the weight is additionally shrunk by lr*wd*P."""
    results = {}
    for wd in (0.0, 0.5):
        p = param(32, 64, seed=7)
        p0 = p.detach().clone()
        opt = MuonAdamW([muon([p], lr=0.1, momentum=0.0, beta2=1.0, weight_decay=wd)], ortho_dtype=F32)
        random_grads([p], seed=8)
        opt.step()
        results[wd] = p.detach().clone()
    g = (p0 - results[0.0]) / 0.1  # the orthogonalised step
    agree = (g * p0) >= 0
    assert 0.3 < agree.float().mean() < 0.7  # both cases present
    assert torch.equal(results[0.5][~agree], results[0.0][~agree])
    torch.testing.assert_close(results[0.5][agree], (results[0.0] - 0.1 * 0.5 * p0)[agree], rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# The optimizer as a whole


def mixed_params():
    return {
        "head": param(64, 16, seed=1),
        "wte": param(64, 16, dtype=torch.bfloat16, seed=2),
        "scalars": param(12, seed=3),
        "fc": [param(64, 16, seed=10 + i, scale=0.25) for i in range(3)],  # tall
        "proj": [param(16, 64, seed=20 + i, scale=0.25) for i in range(2)],  # wide
        "gate": [param(6, 12, dtype=torch.bfloat16, seed=30)],  # bf16 Muon stack: its NorMuon moment stays fp32
    }


def mixed_optimizer(p, **kwargs):
    groups = [adamw([p["head"]], lr=0.008), adamw([p["wte"]], lr=0.2, betas=(0.8, 0.995)), adamw([p["scalars"]], lr=0.5, weight_decay=0.0)]
    groups += [muon(p["gate"], weight_decay=0.1), muon(p["proj"], weight_decay=0.1), muon(p["fc"], weight_decay=0.1)]
    return MuonAdamW(groups, ortho_dtype=F32, **kwargs)


def flat(p):
    return [p["head"], p["wte"], p["scalars"], *p["fc"], *p["proj"], *p["gate"]]


def run(p, opt, steps):
    for step in steps:
        random_grads(flat(p), seed=100 + step)
        for group in opt.param_groups:
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.02 * step
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_state_dict_round_trip_is_bit_exact():
    """Save after 3 steps, reload into a fresh optimizer on copied params: the next 3 steps are bit-identical,
    hyperparameters (incl. initial_lr) come back from the file, and every state tensor keeps its dtype."""
    p = mixed_params()
    opt = mixed_optimizer(p)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    run(p, opt, range(3))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_params = [t.detach().clone() for t in flat(p)]
    run(p, opt, range(3, 6))

    q = mixed_params()
    with torch.no_grad():
        for t, s in zip(flat(q), saved_params):
            t.copy_(s)
    opt2 = mixed_optimizer(q)
    for group in opt2.param_groups:
        group["lr"] = 123.0  # must be overwritten by the checkpoint
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert [g["lr"] for g in opt2.param_groups] == [g["initial_lr"] for g in opt2.param_groups] == [g["initial_lr"] for g in opt.param_groups]
    assert opt2.state[q["gate"][0]]["second_momentum_buffer"].dtype == F32
    assert opt2.state[q["gate"][0]]["momentum_buffer"].dtype == torch.bfloat16
    assert opt2.state[q["wte"]]["exp_avg"].dtype == torch.bfloat16
    run(q, opt2, range(3, 6))
    for a, b in zip(flat(p), flat(q)):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_another_world_size():
    p = mixed_params()
    opt = mixed_optimizer(p)
    run(p, opt, range(1))
    sd = opt.state_dict()
    assert sd["distributed"] == {"rank": 0, "world_size": 1}
    sd["distributed"] = {"rank": 1, "world_size": 2}
    with pytest.raises(ValueError, match="same number of processes"):
        opt.load_state_dict(sd)


def test_determinism():
    finals = []
    for _ in range(2):
        p = mixed_params()
        run(p, mixed_optimizer(p), range(5))
        finals.append([t.detach().clone() for t in flat(p)])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_convergence():
    """50 steps minimising ||p - t||^2 (spec shapes, lr 0.02): every squared distance shrinks by more than 2x."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(48,), (1024, 4), *[(32, 64)] * 3, *[(64, 32)] * 2]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    targets = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    opt = MuonAdamW([adamw(params[:2], lr=0.02, weight_decay=0.0), muon(params[2:5], lr=0.02), muon(params[5:], lr=0.02)], ortho_dtype=F32)
    start = [(p - t).square().sum().item() for p, t in zip(params, targets)]
    for _ in range(50):
        loss = sum((p - t).square().sum() for p, t in zip(params, targets))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    end = [(p - t).square().sum().item() for p, t in zip(params, targets)]
    assert all(math.isfinite(e) and e < s / 2 for s, e in zip(start, end)), list(zip(start, end))


def test_defaults_eager_on_cpu_and_ortho_dtype_follows_compute_dtype(monkeypatch):
    p = param(8, 8)
    assert MuonAdamW([muon([p])], ortho_dtype=F32).compile is False
    from nanochat import common

    monkeypatch.setattr(common, "get_compute_dtype", lambda: (torch.bfloat16, "test"))
    assert MuonAdamW([muon([p])]).ortho_dtype == torch.bfloat16
    monkeypatch.setattr(common, "get_compute_dtype", lambda: (F32, "test"))
    assert MuonAdamW([muon([p])]).ortho_dtype is None  # orthogonalise in the grad dtype


@pytest.mark.parametrize("group, match", [
    (dict(kind="sgd", params=[param(4)], lr=0.1), "'adamw' or 'muon'"),
    (dict(params=[param(4)], lr=0.1), "'adamw' or 'muon'"),
    (dict(kind="adamw", params=[param(4)], lr=0.1, betas=(0.9, 0.95)), r"missing \['eps', 'weight_decay'\]"),
    (adamw([param(4)], betas=0.9), "pair"),
    (muon([param(4, 8), param(8, 4)]), "one shape"),
    (muon([param(16)]), "2-D"),
    (muon([param(4, 4)], ns_steps=6), "ns_steps"),
])
def test_bad_param_groups_are_rejected(group, match):
    with pytest.raises(ValueError, match=match):
        MuonAdamW([group], ortho_dtype=F32)


def test_missing_gradient_is_an_error():
    a, b = param(4), param(8, 8)
    opt = MuonAdamW([adamw([a]), muon([b])], ortho_dtype=F32)
    a.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step()


# -----------------------------------------------------------------------------
# Compiled kernels (the production path on CUDA) against the eager reference


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.slow),
    pytest.param("cuda", marks=pytest.mark.gpu),
])
def test_compiled_kernels_match_eager(device):
    """torch.compile(fullgraph=True) of both kernels gives the eager result (fp32 params to 1e-4 relative, bf16
    params to two bf16 ulps: fused bf16 rounding differs), and LR / momentum schedules compile no new graphs."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from torch._dynamo.utils import counters

    finals = []
    for compile in (False, True):
        p = mixed_params()
        for key in p:
            p[key] = [torch.nn.Parameter(t.detach().to(device)) for t in p[key]] if isinstance(p[key], list) else torch.nn.Parameter(p[key].detach().to(device))
        opt = mixed_optimizer(p, compile=compile)
        for step in range(3):
            if step == 1:
                graphs = counters["stats"]["unique_graphs"]
            for t in flat(p):
                t.grad = torch.randn(t.shape, generator=torch.Generator().manual_seed(step)).to(device=device, dtype=t.dtype)
            for group in opt.param_groups:
                group["lr"] *= 0.9
                if group["kind"] == "muon":
                    group["momentum"] = 0.9 + 0.01 * step
            opt.step()
        assert counters["stats"]["unique_graphs"] == graphs
        finals.append([t.detach() for t in flat(p)])
    for a, b in zip(*finals):
        tol = dict(rtol=2**-6, atol=2e-4) if a.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), **tol)
