"""The shared training loop (nanochat/loop.py): cadence of evals and checkpoints, horizons, resume, logs."""

import json
import logging

import pytest
import torch

from nanochat.checkpoint_manager import load_checkpoint
from nanochat.loop import Checkpointer, DataHorizon, FixedHorizon, Periodic, TrainLoop
from nanochat.training import StepMeter, TrainStep


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.config = None

    def forward(self, x, y):
        return ((x.float() * self.w).sum(-1) - y.float()).square().mean()


def _batches(n=None):
    i = 0
    while n is None or i < n:
        yield torch.full((2, 3), float(i % 5)), torch.zeros(2), {"batch": i, "done": n is not None and i >= n - 1}
        i += 1


def _loop(tmp_path, num_iterations=6, every=2, save_every=3, calls=None, horizon=None, batches=None):
    model = _Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    calls = [] if calls is None else calls
    periodic = [Periodic("eval", every, lambda s: calls.append(("eval", s)) or {"val_bpb": 1.0 / (s + 1)}, at_start=True),
                Periodic("late", every, lambda s: calls.append(("late", s)))]
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), save_every, model, optimizer, meta={"model_config": {"n": 3}})
    return TrainLoop(step=TrainStep(model, optimizer, 1), batches=batches or _batches(), schedule=lambda s, p: {"lrm": 1.0 - p},
                     horizon=horizon or FixedHorizon(num_iterations), periodic=periodic, checkpointer=checkpointer,
                     meter=StepMeter(6, 1.0, None), wandb_run=_NullRun()), calls


class _NullRun:
    def log(self, *a, **k):
        pass


def test_cadence_of_evals_and_checkpoints(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    loop, calls = _loop(tmp_path)
    result = loop.run()
    # at_start only for the first job; both at every 2nd step and at the last step (6)
    assert calls == [("eval", 0), ("eval", 2), ("late", 2), ("eval", 4), ("late", 4), ("eval", 6), ("late", 6)]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("meta")) == ["meta_000003.json", "meta_000006.json"]
    assert result.step == 6 and result.min_val_bpb == pytest.approx(1 / 7)
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(steps) == 6 and steps[0].startswith("step 00000/00006 (0.00%)")


def test_meta_is_strict_json_and_records_the_loop_state(tmp_path):
    loop, _ = _loop(tmp_path)
    loop.checkpointer.meta["odd"] = {"nan": float("nan"), "inf": float("inf")}
    loop.run()
    text = (tmp_path / "ckpt" / "meta_000006.json").read_text()
    meta = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert meta["odd"] == {"nan": None, "inf": None}
    assert meta["step"] == 6 and meta["val_bpb"] == pytest.approx(1 / 7)
    assert meta["loop_state"]["meter"]["timed_steps"] == 0 and meta["model_config"] == {"n": 3}
    # the loader state of the last batch trained on (step 5 trained batch 5; batch 6 was only prefetched)
    assert meta["dataloader_state_dict"]["batch"] == 5


def test_resume_from_a_meta_without_loop_state_starts_the_meters_fresh(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    loop, calls = _loop(tmp_path)
    result = loop.run(resume={"step": 4, "model_config": {}})  # an older run's / upstream's meta
    assert result.step == 6 and ("eval", 4) in calls
    assert any("no loop state" in r.getMessage() for r in caplog.records)
    _, _, meta = load_checkpoint(str(tmp_path / "ckpt"), 6, "cpu")
    assert "meta_000004.json" not in {p.name for p in (tmp_path / "ckpt").iterdir()}  # the resume step is not re-saved
    assert meta["loop_state"]["step"] == 6


def test_data_horizon_stops_when_the_pending_batch_is_past_the_data(tmp_path):
    horizon = DataHorizon(lambda state: (min(1.0, (state["batch"] + 1) / 4), state["done"]), torch.device("cpu"))
    loop, _ = _loop(tmp_path, horizon=horizon, batches=_batches(4), save_every=-1)
    result = loop.run()
    # batches 0..3 exist; batch 3 is flagged done, so it is prefetched but never trained on
    assert result.step == 3


