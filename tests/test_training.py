"""Scaling rules and schedules (nanochat/training.py) and the shared train step (nanochat/loop.py)."""

import itertools
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from nanochat import loop, training
from nanochat.loop import NonFiniteLossError, TrainStep
from nanochat.training import (OutOfMemory, StepMeter, grad_accum_steps_for, lr_multiplier, muon_momentum,
                               muon_weight_decay, scaling_plan)

# d12 (width 768, 6 heads, 6 value-embedding layers): 12 x 12 x 768^2 block matrices + 12 x 6 x 6 value-embedding
# gate weights + 32,768 x 768 lm_head (the closed form of tests/test_gpt.py::test_per_depth_table_is_the_closed_form).
D12_SCALING_PARAMS = 12 * 12 * 768**2 + 12 * 6 * 6 + 32768 * 768


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


def test_grad_accum_steps_and_the_nearest_valid_values():
    assert grad_accum_steps_for(65_536, 8, 2048, 1) == 4
    with pytest.raises(ValueError, match="not divisible") as err:
        grad_accum_steps_for(65_536, 3, 2048, 1)
    assert "--total-batch-size=61440 or --total-batch-size=67584" in str(err.value)
    assert "--device-batch-size=2" in str(err.value)


# The speedrun's schedule (d24, N = 5568), as upstream's run logged it.
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
    loop.apply_schedule(opt, 0.5, momentum=0.97, weight_decay=0.1)
    a, m = opt.param_groups
    assert (a["lr"], a["weight_decay"]) == (0.05, 0.01)
    assert (m["lr"], m["momentum"], m["weight_decay"]) == (0.1, 0.97, 0.1)


def test_progress_schedules():
    # SFT defaults: flat for the first half, then linear to 0; midtraining: flat to 80%, then linear to 0.
    assert training.progress_lr_multiplier(0.3) == 1.0
    assert training.progress_lr_multiplier(0.75) == pytest.approx(0.5)
    assert training.progress_lr_multiplier(1.0) == pytest.approx(0.0)
    assert training.progress_lr_multiplier(0.9, warmdown_ratio=0.2) == pytest.approx(0.5)
    assert training.progress_lr_multiplier(0.05, warmup_ratio=0.1) == pytest.approx(0.5)
    assert training.momentum_warmup(0) == 0.85 and training.momentum_warmup(150) == pytest.approx(0.9)
    assert training.momentum_warmup(1000) == 0.95
    assert training.linear_decay(0, 10) == 1.0 and training.linear_decay(9, 10) == pytest.approx(0.1)


# -----------------------------------------------------------------------------
# The step


class _TinyLM(torch.nn.Module):
    """Embedding + linear head; optionally NaN on chosen calls, or OOM above a row count."""

    def __init__(self, nan_calls=(), oom_rows=None):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16)
        self.nan_calls, self.oom_rows, self.calls = set(nan_calls), oom_rows, 0

    def forward(self, x, y):
        self.calls += 1
        if self.oom_rows is not None and x.size(0) > self.oom_rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        loss = torch.nn.functional.cross_entropy(self.head(self.emb(x)).view(-1, 16), y.reshape(-1))
        return loss * float("nan") if self.calls in self.nan_calls else loss


def _stream(n, rows=4, seed=0, log=None):
    """(x, y, state) batches as a loader yields them; `log` records each fetch, to see when the loop asks for data."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        if log is not None:
            log.append(("fetch", i))
        yield torch.randint(0, 16, (rows, 5), generator=g), torch.randint(0, 16, (rows, 5), generator=g), {"batch": i}


def _micro(n, **kw):
    """The (x, y) micro-batches of one step, as TrainLoop hands them to TrainStep."""
    return ((x, y) for x, y, _ in _stream(n, **kw))


def _sgd(model, lr):
    """SGD with the initial_lr that TrainStep's schedule scales (GPT.setup_optimizer sets it for MuonAdamW)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    return optimizer


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_nan_in_the_first_micro_batch_stops_before_the_optimizer_step():
    model = _TinyLM(nan_calls={1})  # the first of two micro-batches
    before = _params(model)
    step = TrainStep(model, _sgd(model, 0.1), grad_accum_steps=2)
    with pytest.raises(NonFiniteLossError, match="NaN/inf in 1 of 2 micro-batches"):
        step(_micro(2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_the_nan_verdict_is_queued_before_the_last_backward(monkeypatch):
    """The host waits for the loss verdict once per step; queued before the last backward, that wait leaves the
    backward running on the GPU (see loop._loss_verdict). A NaN in that last micro-batch still stops the step."""
    events = []
    verdict = loop._loss_verdict
    monkeypatch.setattr(loop, "_loss_verdict", lambda losses: events.append("verdict") or verdict(losses))
    model = _TinyLM(nan_calls={3})
    model.head.weight.register_hook(lambda grad: events.append("backward"))
    before = _params(model)
    with pytest.raises(NonFiniteLossError, match="NaN/inf in 1 of 3 micro-batches"):
        TrainStep(model, _sgd(model, 0.1), grad_accum_steps=3)(_micro(3))
    assert events == ["backward", "backward", "verdict", "backward"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_logged_loss_is_the_mean_over_micro_batches():
    torch.manual_seed(0)
    model = _TinyLM()
    batches = list(_stream(3))
    with torch.no_grad():
        expected = sum(model(x, y).item() for x, y, _ in batches[:3]) / 3
    model.calls = 0
    result = TrainStep(model, _sgd(model, 0.0), grad_accum_steps=3)((x, y) for x, y, _ in batches)
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.tokens == 3 * 4 * 5 and not result.skipped


@pytest.mark.parametrize("rows,accum", [(6, 1), (3, 2), (2, 3), (1, 6)])
def test_gradient_accumulation_equals_one_big_batch(rows, accum):
    """Every device batch x accumulation split of the same 6 rows gives the big batch's update."""
    torch.manual_seed(0)
    ref, model = _TinyLM(), _TinyLM()
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 16, (6, 5), generator=g), torch.randint(0, 16, (6, 5), generator=g)
    TrainStep(ref, _sgd(ref, 0.5), 1)(iter([(x, y)]))
    micro = [(x[i:i + rows], y[i:i + rows]) for i in range(0, 6, rows)]
    TrainStep(model, _sgd(model, 0.5), accum)(iter(micro))
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_next_batch_is_fetched_during_accumulation_and_the_resume_state_lags_it():
    from nanochat.loop import TrainLoop

    events = []
    model = _TinyLM()
    original = model.forward
    model.forward = lambda x, y: (events.append(("forward",)), original(x, y))[1]
    step = TrainStep(model, _sgd(model, 0.1), grad_accum_steps=2)
    loop = TrainLoop(step=step, batches=_stream(10, log=events), horizon=None, schedule=None, periodic=[], checkpointer=None,
                     meter=None, wandb_run=None)
    loop.pending = next(loop.batches)  # what run() fetches before the first step
    step(loop._micro_batches(2))
    # fetch 0 before the step, then each forward is followed by the fetch of the next micro-batch
    assert events == [("fetch", 0), ("forward",), ("fetch", 1), ("forward",), ("fetch", 2)]
    assert loop.position() == {"batch": 2}  # the pending batch: what the horizon looks at
    assert loop.trained_state == {"batch": 1}  # the last one trained on: what a checkpoint records


def test_out_of_memory_in_a_step_is_a_one_line_error_naming_the_flag():
    model = _TinyLM(oom_rows=2)
    step = TrainStep(model, _sgd(model, 0.1), 1, oom_hint="lower --device-batch-size (now 4)")
    with pytest.raises(OutOfMemory, match=r"4 rows x 5 tokens per micro-batch; lower --device-batch-size \(now 4\)"):
        step(_micro(1))


def test_fp16_overflow_skips_the_update():
    model = _TinyLM()
    before = _params(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    step = TrainStep(model, _sgd(model, 0.1), 1, scaler=scaler,
                     loss_fn=lambda m, x, y: m(x, y) * 1e36)  # scaled by 2^16 the gradients overflow to inf
    result = step(_micro(1))
    assert result.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0**16


# -----------------------------------------------------------------------------
# The device-batch probe


def test_probe_picks_the_largest_batch_that_fits():
    model = _TinyLM(oom_rows=8)
    messages = []

    def try_batch(b):
        x = torch.randint(0, 16, (b, 5))
        model(x, x).backward()

    candidates = training.batch_size_candidates(total_batch_size=64 * 5, seq_len=5, world_size=1)
    assert candidates == [64, 32, 16, 8, 4, 2, 1]
    assert training.probe_device_batch_size(try_batch, candidates, torch.device("cpu"), log=messages.append) == 8
    assert [m.split(" -> ")[1].split(" (")[0] for m in messages] == ["does not fit"] * 3 + ["fits"]
    model.oom_rows = 0
    with pytest.raises(OutOfMemory, match="even 1 row"):
        training.probe_device_batch_size(try_batch, candidates, torch.device("cpu"), log=messages.append)


def test_the_probe_step_leaves_weights_and_optimizer_state_untouched(tiny_gpt):
    model = tiny_gpt(scrambled=True)
    optimizer = model.setup_optimizer(weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try_batch = training.probe_training_step(model, optimizer, seq_len=16, vocab_size=265, device=torch.device("cpu"))
    assert optimizer.state  # allocated (it had none), so the probe counts its memory
    try_batch(4)
    try_batch.reset()
    assert not optimizer.state
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_probe_keeps_a_warm_started_optimizers_moments(tiny_gpt):
    model = tiny_gpt(scrambled=True)
    optimizer = model.setup_optimizer(weight_decay=0.1)
    x = torch.randint(0, 265, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x, x).backward()
    optimizer.step()  # moments, as SFT's warm start loads them
    model.zero_grad(set_to_none=True)
    before = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}
    try_batch = training.probe_training_step(model, optimizer, seq_len=16, vocab_size=265, device=torch.device("cpu"))
    try_batch(4)
    try_batch.reset()
    after = {id(p): s for p, s in optimizer.state.items()}
    assert after.keys() == before.keys()
    for key, state in before.items():
        for name, value in state.items():
            assert torch.equal(after[key][name], value) if torch.is_tensor(value) else after[key][name] == value, name


def test_training_after_the_probe_reuses_the_probes_compiled_graph(tiny_gpt, byte_tokenizer):
    from torch._dynamo.testing import CompileCounter

    from nanochat.chat_dataloader import packed_conversation_loader

    torch._dynamo.reset()
    model = tiny_gpt(n_layer=1, sequence_len=16)
    counter = CompileCounter()  # counts the graphs compiled for the model alone (not the optimizer's)
    compiled = torch.compile(model, backend=counter, dynamic=False)
    optimizer = model.setup_optimizer()
    B, T = 2, 16
    try_batch = training.probe_training_step(compiled, optimizer, seq_len=T, vocab_size=265, device=torch.device("cpu"))
    try_batch(B)
    try_batch.reset()
    graphs = counter.frame_count
    assert graphs > 0
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    batches = packed_conversation_loader([chat] * 20, byte_tokenizer, B, T, device=torch.device("cpu"))
    TrainStep(compiled, optimizer, 2)((x, y) for x, y, _ in itertools.islice(batches, 2))
    assert counter.frame_count == graphs  # no second compile of the chosen size


@pytest.fixture
def cuda_memory(monkeypatch):
    """A CUDA device on paper: `set(free=, reserved=, total=, fraction=)` in GiB, and `peaks` {rows: GiB}."""
    GiB = 2**30
    card = SimpleNamespace(free=0, reserved=0, total=80, fraction=1.0, peaks={}, rows=None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card.free * GiB, card.total * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: card.reserved * GiB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: card.fraction)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=card.total * GiB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: card.peaks[card.rows] * GiB)
    card.try_batch = lambda rows: setattr(card, "rows", rows)
    return card


def test_the_probe_margin_is_taken_against_the_memory_this_process_can_have(cuda_memory):
    cuda_memory.peaks = {16: 20, 8: 10, 4: 7, 2: 5}
    probe = lambda: training.probe_device_batch_size(cuda_memory.try_batch, [16, 8, 4, 2], torch.device("cuda"), log=lambda m: None)
    # Another process holds most of the 80 GB card: 2 GiB are ours, 6 free, so 90% of 8 GiB.
    cuda_memory.free, cuda_memory.reserved = 6, 2
    assert probe() == 4
    # A per-process cap of 15% (12 GiB, a 12 GB card emulated) on an otherwise empty card: 90% of 12 GiB.
    cuda_memory.free, cuda_memory.reserved, cuda_memory.fraction = 78, 2, 0.15
    assert probe() == 8


def test_auto_device_batch_size_off_cuda_uses_the_fallback():
    messages = []
    rows = training.resolve_device_batch_size("auto", 32, None, None, 65536, 2048, 1, 100, torch.device("cpu"), log=messages.append)
    assert rows == 32 and "no memory probe on cpu" in messages[0]
    assert training.resolve_device_batch_size(8, 32, None, None, 65536, 2048, 1, 100, torch.device("cpu")) == 8


# -----------------------------------------------------------------------------
# Two ranks: every decision is made together


def _decisions_on_two_ranks(rank, world_size, model):
    """Rank 1 alone goes wrong, twice: a NaN loss, then (fp16) overflowing gradients."""
    import copy

    from nanochat.loop import NonFiniteLossError, TrainStep

    x = torch.randint(0, 265, (2, 16), generator=torch.Generator().manual_seed(rank))
    batches = lambda: iter([(x, x)])  # noqa: E731
    out = {}

    nan_model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in nan_model.state_dict().items()}
    step = TrainStep(nan_model, nan_model.setup_optimizer(), 1,
                     loss_fn=lambda m, a, b: m(a, b) * (float("nan") if rank == 1 else 1.0))
    try:
        step(batches())
        out["nan"] = None
    except NonFiniteLossError as err:
        out["nan"] = str(err)
    out["nan_unchanged"] = all(torch.equal(v, before[k]) for k, v in nan_model.state_dict().items())

    fp16_model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in fp16_model.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    calls = []

    def overflow_once(m, a, b):  # rank 1's first step has inf gradients (a finite loss): a simulated fp16 overflow
        calls.append(1)
        loss = m(a, b)
        if rank == 1 and len(calls) == 1:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    step = TrainStep(fp16_model, fp16_model.setup_optimizer(), 1, scaler=scaler, loss_fn=overflow_once)
    first = step(batches())
    out["unchanged_after_first"] = all(torch.equal(v, before[k]) for k, v in fp16_model.state_dict().items())
    second = step(batches())
    out.update(skipped=[first.skipped, second.skipped], scale=scaler.get_scale(), loss=second.loss,
               changed_after_second=not all(torch.equal(v, before[k]) for k, v in fp16_model.state_dict().items()))
    return out


def test_nan_and_fp16_skip_decisions_are_shared_across_ranks(tiny_gpt, run_on_ranks):
    r0, r1 = run_on_ranks(_decisions_on_two_ranks, tiny_gpt(scrambled=True), timeout=300)
    # A NaN on rank 1 only: both ranks stop before the optimizer step, with the same message.
    assert r0["nan"] is not None and r0["nan"] == r1["nan"] and "NaN/inf in 1 of 2 micro-batches" in r0["nan"]
    assert r0["nan_unchanged"] and r1["nan_unchanged"]
    # An fp16 overflow on rank 1 only: both skip the first update (and halve the scale), both take the second.
    assert r0["skipped"] == r1["skipped"] == [True, False]
    assert r0["unchanged_after_first"] and r1["unchanged_after_first"]
    assert r0["scale"] == r1["scale"] == 0.5
    assert r0["changed_after_second"] and r1["changed_after_second"]
    assert r0["loss"] == pytest.approx(r1["loss"])  # the logged loss is the mean over both ranks


def test_step_meter_excludes_warmup_from_timing():
    meter = StepMeter(tokens_per_step=100, flops_per_token=2.0, peak_flops=None, warmup=2)
    for step in range(5):
        meter.start()
        m = meter.stop(step, loss=1.0, progress=(step + 1) / 20)
    assert meter.timed_steps == 2 and meter.timed_tokens == 200
    assert m["mfu"] is None and m["eta"] is not None
    assert m["loss"] == pytest.approx(1.0)
    line = meter.format_line(4, 20, 0.2, m, 1.0, extra="epoch: 1")
    assert line.startswith("step 00004/00020 (20.00%) | loss: 1.000000 | lrm: 1.00 |") and "mfu: n/a | epoch: 1" in line
    assert meter.format_line(4, None, 0.5, m, 1.0).startswith("step 00004 (50.00%)")


def test_the_step_line_names_what_its_mfu_is_measured_against():
    assert training.mfu_label("cuda", torch.float32) == "bf16_mfu"  # the card's bf16 tensor-core peak
    assert training.mfu_label("cpu", torch.float32) == "cpu_fp32_mfu"  # this CPU's measured fp32 matmul rate
    assert training.mfu_label("mps", torch.bfloat16) == "mps_bf16_mfu"
    meter = StepMeter(100, 2.0, peak_flops=1e3, mfu_label=training.mfu_label("cpu", torch.float32))
    meter.start()
    line = meter.format_line(0, 10, 0.1, meter.stop(0, loss=1.0, progress=0.1), 1.0)
    assert "| cpu_fp32_mfu: " in line and "bf16" not in line


def test_cpu_trains_in_fp32_by_default_even_with_native_bf16(monkeypatch):
    """bf16 on CPU is opt-in (NANOCHAT_DTYPE=bfloat16): it did not keep the fp32 loss curve where measured."""
    from nanochat import common

    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    common.get_compute_dtype.cache_clear()
    try:
        dtype, reason = common.get_compute_dtype()
        assert dtype == torch.float32 and "NANOCHAT_DTYPE=bfloat16" in reason
        monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
        common.get_compute_dtype.cache_clear()
        assert common.get_compute_dtype()[0] == torch.bfloat16
    finally:
        common.get_compute_dtype.cache_clear()


def test_cpu_attention_runs_in_fp32_for_bf16_inputs():
    """The fused CPU attention kernel rounds its softmax (and, in backward, the score gradients) to bf16; bf16
    models on CPU attend in fp32 instead, rounding once at the output: the same values as fp32 attention."""
    from nanochat import flash_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 4, 32, generator=g) for _ in range(3))  # (B, T, H, D)
    q16, k16, v16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
    y = flash_attention.flash_attn_func(q16, k16, v16, causal=True, window_size=(-1, 0))
    assert y.dtype == torch.bfloat16
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q16, k16, v16))
    ref = flash_attention.flash_attn_func(q32, k32, v32, causal=True, window_size=(-1, 0))
    assert torch.equal(y, ref.bfloat16())
    y.float().sum().backward()
    ref.sum().backward()
    assert torch.equal(q16.grad, q32.grad.bfloat16())


# -----------------------------------------------------------------------------
# One definition of what base, mid, SFT and RL share


def test_usable_cores_is_the_affinity_mask_everywhere_it_is_counted(monkeypatch):
    from nanochat.common import usable_cores
    from nanochat.dataloader import default_tokenizer_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert usable_cores() == 6
    assert default_tokenizer_threads("cpu") == 3  # half the usable cores
    threads = torch.get_num_threads()
    try:
        assert training.configure_cpu_threads() == 6
    finally:
        torch.set_num_threads(threads)
    monkeypatch.delattr(os, "sched_getaffinity")  # not on Linux: the CPU count
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert usable_cores() == 5


def _guarded_collectives():
    """Every module's "more than one rank?" guard, called the way a single process calls it."""
    from nanochat import chateval, checkpoint_manager, dataloader, rl
    from nanochat.loop import TrainLoop

    t = torch.ones(2)
    assert training._all_reduce(t, dist.ReduceOp.SUM) is t
    assert training._everywhere(True, torch.device("cpu")) is True
    assert rl.mean_over_ranks([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    assert chateval._reduce_counts(3, 4, torch.device("cpu")) == (3, 4)
    checkpoint_manager._barrier()
    assert dataloader.gather_loader_states({"epoch": 1}) == {"epoch": 1}
    loop = TrainLoop(step=TrainStep(torch.nn.Linear(2, 2), None, 1), batches=None, horizon=lambda state: (0.5, True),
                     schedule=None, periodic=[], checkpointer=None, meter=None, wandb_run=None)
    assert loop.progress(0) == (0.5, True)


def test_a_world_of_one_enters_no_collective_with_or_without_a_process_group(monkeypatch):
    from dist_harness import free_port

    from nanochat.common import dist_world_size

    assert dist_world_size() == 1
    _guarded_collectives()

    def refuse(*args, **kwargs):
        raise AssertionError("a collective ran in a world of one")

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for name in ("all_reduce", "all_gather_object", "barrier"):
            monkeypatch.setattr(dist, name, refuse)
        assert dist_world_size() == 1
        _guarded_collectives()
    finally:
        dist.destroy_process_group()


def test_device_batch_size_auto_means_one_cpu_fallback_in_every_stage(monkeypatch):
    from scripts import base_train, chat_sft, mid_train

    monkeypatch.setattr(training, "CPU_DEVICE_BATCH_SIZE", 7)
    for script in (base_train, mid_train, chat_sft):
        flag = next(a for a in script.build_parser()._actions if a.dest == "device_batch_size")
        assert flag.help.endswith("(probed on CUDA), 7 elsewhere"), script.__name__


def test_each_stage_declares_its_lr_defaults_from_one_table():
    from scripts import base_train, chat_rl, chat_sft, mid_train

    # The spec's defaults: base from scratch 0.3 / 0.008 / 0.02; mid and RL 0.2 / 0.004 / 0.02; SFT inherits.
    assert training.STAGE_LRS == {"base": (0.3, 0.008, 0.02), "mid": (0.2, 0.004, 0.02), "sft": (None, None, None),
                                  "rl": (0.2, 0.004, 0.02)}
    for stage, script in (("base", base_train), ("mid", mid_train), ("sft", chat_sft), ("rl", chat_rl)):
        args = script.build_parser().parse_args([])
        assert (args.embedding_lr, args.unembedding_lr, args.matrix_lr) == training.STAGE_LRS[stage], stage


def test_cpu_training_keeps_freed_heap_memory(monkeypatch):
    """configure_cpu_threads sets glibc up to keep freed memory (the fp32 (N, V) temporaries then reuse their pages
    instead of page-faulting every step; the speed A/B is in docs/performance.md), and glibc accepts the settings."""
    import platform

    calls = []
    monkeypatch.setattr(training, "keep_freed_heap_memory", lambda: calls.append(1))
    threads = torch.get_num_threads()
    try:
        training.configure_cpu_threads(1)
    finally:
        torch.set_num_threads(threads)
    assert calls == [1]
    monkeypatch.undo()
    if platform.libc_ver()[0] == "glibc":
        assert training.keep_freed_heap_memory() is True
