"""Scaling rules, schedules and the shared train step (nanochat/training.py)."""

import math

import pytest
import torch

from nanochat import training
from nanochat.training import (StepMeter, TrainStep, grad_accum_steps_for, lr_multiplier, muon_momentum,
                               muon_weight_decay, scaling_plan)

D12_SCALING_PARAMS = 110_100_912  # 01 Appendix A


def test_d12_at_65536_tokens_scales_lr_and_wd():
    plan = scaling_plan(D12_SCALING_PARAMS, D12_SCALING_PARAMS, flops_per_token=759_696_048, total_batch_size=65_536)
    assert plan.batch_lr_scale == pytest.approx(0.353553, abs=1e-6)
    assert plan.weight_decay == pytest.approx(0.098995, abs=1e-6)
    assert plan.num_iterations == int(12 * D12_SCALING_PARAMS) // 65_536


@pytest.mark.parametrize("scaling_params,expected_batch", [
    (41_943_232, 262_144),      # d8
    (110_100_912, 524_288),     # d12
    (435_160_240, 1_048_576),   # d20
    (729_810_624, 1_048_576),   # d24
    (1_677_724_672, 2_097_152),  # d32
])
def test_auto_batch_size_matches_appendix_a(scaling_params, expected_batch):
    plan = scaling_plan(scaling_params, D12_SCALING_PARAMS, flops_per_token=1.0)
    assert plan.total_batch_size == expected_batch


def test_d20_iterations_and_weight_decay_match_appendix_a():
    plan = scaling_plan(435_160_240, D12_SCALING_PARAMS, flops_per_token=2_886_212_784)
    assert plan.num_iterations == 4_980
    assert plan.weight_decay == pytest.approx(0.1002, abs=1e-4)
    assert plan.batch_lr_scale == pytest.approx(math.sqrt(2))


def test_horizon_precedence_and_errors():
    assert scaling_plan(1000, 1000, 10.0, total_batch_size=100, num_iterations=7).num_iterations == 7
    assert scaling_plan(1000, 1000, 10.0, total_batch_size=100, target_flops=10.0 * 100 * 33).num_iterations == 33
    with pytest.raises(ValueError, match="no training horizon"):
        scaling_plan(1000, 1000, 10.0, total_batch_size=100, target_param_data_ratio=-1)
    with pytest.raises(ValueError, match="resolves to 0 steps"):
        scaling_plan(10, 10, 10.0, total_batch_size=1024)


def test_grad_accum_steps():
    assert grad_accum_steps_for(65_536, 8, 2048, 1) == 4
    with pytest.raises(ValueError, match="not divisible"):
        grad_accum_steps_for(65_536, 3, 2048, 1)


# The speedrun schedule table (d24, N = 5568) of 01 §3.5.
@pytest.mark.parametrize("it,lrm,mom,wd", [
    (0, 0.025, 0.85, 0.059738),
    (1, 0.05, 0.8503, 0.059738),
    (39, 1.0, 0.8617, 0.059731),
    (200, 1.0, 0.91, 0.059548),
    (400, 1.0, 0.97, 0.058981),
    (1949, 1.0, 0.97, 0.043427),
    (1950, 0.999737, 0.969981, 0.043412),
    (3000, 0.724109, 0.949671, 0.026238),
    (4000, 0.461605, 0.930329, 0.010946),
    (5000, 0.199102, 0.910986, 0.001521),
    (5567, 0.050263, 0.900019, 4.8e-9),
])
def test_schedules_match_speedrun_table(it, lrm, mom, wd):
    N = 5568
    assert lr_multiplier(it, N) == pytest.approx(lrm, abs=1e-6)
    assert muon_momentum(it, N) == pytest.approx(mom, abs=1e-4)
    assert muon_weight_decay(it, N, 0.0597384) == pytest.approx(wd, abs=1e-6)


def test_apply_schedule_touches_muon_only_for_momentum_and_wd():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1, "kind": "adamw", "weight_decay": 0.01},
                           {"params": [p2], "lr": 0.2, "kind": "muon", "momentum": 0.9, "weight_decay": 0.3}])
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    training.apply_schedule(opt, 0.5, momentum=0.97, weight_decay=0.1)
    a, m = opt.param_groups
    assert (a["lr"], a["weight_decay"]) == (0.05, 0.01)
    assert (m["lr"], m["momentum"], m["weight_decay"]) == (0.1, 0.97, 0.1)


class _TinyLM(torch.nn.Module):
    def __init__(self, fail_rows=None, nan=False):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16)
        self.fail_rows = fail_rows
        self.nan = nan

    def forward(self, x, y):
        if self.fail_rows is not None and x.size(0) > self.fail_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        logits = self.head(self.emb(x))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 16), y.view(-1))
        return loss * float("nan") if self.nan else loss


def _batches(n, rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 16, (rows, 5), generator=g), torch.randint(0, 16, (rows, 5), generator=g)) for _ in range(n)]


def test_oom_retry_halves_rows_and_gives_the_same_update():
    torch.manual_seed(0)
    ref = _TinyLM()
    oom = _TinyLM(fail_rows=1)
    oom.load_state_dict(ref.state_dict())
    batches = _batches(2)
    messages = []
    step_ref = TrainStep(ref, torch.optim.SGD(ref.parameters(), lr=0.1))
    step_oom = TrainStep(oom, torch.optim.SGD(oom.parameters(), lr=0.1), log=messages.append)
    step_ref(batches)
    step_oom(batches)
    assert step_oom.splits == 4 and step_oom.oom_retries == 2
    assert "halving the device batch to 2 rows" in messages[0]
    for a, b in zip(ref.parameters(), oom.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_before_the_optimizer_step():
    model = _TinyLM(nan=True)
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(training.NonFiniteLossError, match="training loss is nan"):
        step(_batches(1))
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_step_meter_excludes_warmup_from_timing():
    meter = StepMeter(num_iterations=20, tokens_per_step=100, flops_per_token=2.0, peak_flops=None, warmup=2)
    for step in range(5):
        meter.start()
        m = meter.stop(step, loss=1.0)
    assert meter.timed_steps == 2
    assert m["mfu"] is None
    assert m["loss"] == pytest.approx(1.0)
    line = training.format_step_line(4, 20, m, 1.0, extra="epoch: 1")
    assert line.startswith("step 00004/00020 (20.00%) | loss: 1.000000 | lrm: 1.00 |") and "bf16_mfu: n/a | epoch: 1" in line
