"""The shared training loop (nanochat/loop.py): cadence of evals and checkpoints, horizons, resume, logs."""

import json
import logging

import pytest
import torch

from nanochat.checkpoint_manager import load_checkpoint
from nanochat.loop import Checkpointer, Periodic, TrainLoop, TrainStep
from nanochat.training import StepMeter


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
                     horizon=horizon or num_iterations, periodic=periodic, checkpointer=checkpointer,
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
    horizon = lambda state: (min(1.0, (state["batch"] + 1) / 4), state["done"])  # noqa: E731
    loop, _ = _loop(tmp_path, horizon=horizon, batches=_batches(4), save_every=-1)
    result = loop.run()
    # batches 0..3 exist; batch 3 is flagged done, so it is prefetched but never trained on
    assert result.step == 3


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_resumed_loop_trains_on_exactly_the_batches_the_uninterrupted_one_did(tmp_path, prefetch):
    """The loop fetches the micro-batches and records the loader state of the last one trained on: a loader
    resumed from that state yields the next untrained batch, with or without prefetch (RL), at any accumulation."""

    def run(out, start=0, resume=None, num_iterations=6):
        def loader():  # resumes after the batch its state names, as the real loaders do
            i = start
            while True:
                yield torch.full((2, 3), float(i)), torch.zeros(2), {"batch": i}
                i += 1

        model = _Linear()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        for g in optimizer.param_groups:
            g["initial_lr"] = g["lr"]
        seen = lambda m, x, y: out.append(int(x[0, 0])) or m(x, y)  # noqa: E731
        loop = TrainLoop(step=TrainStep(model, optimizer, 2, loss_fn=seen), batches=loader(), prefetch=prefetch,
                         horizon=num_iterations, schedule=lambda s, p: {"lrm": 1.0}, periodic=[],
                         checkpointer=Checkpointer(str(tmp_path / f"ckpt{prefetch}"), 3, model, optimizer),
                         meter=StepMeter(6, 1.0, None), wandb_run=_NullRun())
        loop.run(resume=resume)

    full, resumed = [], []
    run(full)
    _, _, meta = load_checkpoint(str(tmp_path / f"ckpt{prefetch}"), 3, "cpu")
    assert meta["dataloader_state_dict"] == {"batch": 5}  # steps 0-2 trained batches 0-5, two per step
    run(resumed, start=meta["dataloader_state_dict"]["batch"] + 1, resume=meta)
    assert full == list(range(12)) and resumed == full[6:]


def test_every_checkpoint_loading_script_declares_the_same_source_flags():
    """-i/-g/-s come from one helper: the scripts' help and defaults cannot drift apart."""
    from scripts import base_eval, base_loss, chat_eval, chat_rl, chat_sft, mid_train

    def flags(module):
        return {a.option_strings[0]: (a.option_strings, a.default, a.help) for a in module.build_parser()._actions
                if a.option_strings[0] in ("-i", "-g", "-s")}

    evals = [flags(m) for m in (base_eval, base_loss, chat_eval)]
    trainers = [flags(m) for m in (chat_rl, mid_train, chat_sft)]
    for group in (evals, trainers):
        assert all(f["-g"] == group[0]["-g"] and f["-s"] == group[0]["-s"] for f in group)
    assert evals[0]["-s"][0] == ["-s", "--step"] and trainers[0]["-s"][0] == ["-s", "--model-step"]
    assert evals[0]["-g"][1] is None and evals[0]["-s"][1] is None and "largest d<N>" in evals[0]["-g"][2]
    assert "-i" not in evals[1] and evals[2]["-i"][1] is None  # base_loss reads base only; chat_eval requires -i
    assert [f["-i"][1] for f in trainers] == ["sft", "base", "mid"]


def test_the_chat_lm_eval_and_export_scripts_declare_the_evaluators_checkpoint_flags():
    """chat_cli, chat_web, lm_eval and export_hf take -i/-g/-s from the helper base_eval uses: none can drift."""
    from scripts import base_eval, chat_cli, chat_web, export_hf, lm_eval

    def flags(module):
        return {a.option_strings[0]: a for a in module.build_parser()._actions if a.option_strings[:1] in (["-i"], ["-g"], ["-s"])}

    reference = flags(base_eval)
    for module, default in ((chat_cli, "sft"), (chat_web, "sft"), (lm_eval, "base"), (export_hf, "sft")):
        declared = flags(module)
        for flag in ("-g", "-s"):
            assert (declared[flag].option_strings, declared[flag].default, declared[flag].help) == \
                (reference[flag].option_strings, reference[flag].default, reference[flag].help), (module.__name__, flag)
        assert declared["-i"].option_strings == ["-i", "--source"] and declared["-i"].default == default
        assert tuple(declared["-i"].choices) == ("base", "mid", "sft", "rl"), module.__name__


def test_a_job_without_a_period_runs_only_where_its_start_and_last_flags_say():
    # mid/SFT's --eval-every -1: val bpb at the end only (no "huge period" stand-in for "never in between")
    only_last = Periodic("val bpb", -1, lambda s: None)
    assert [s for s in range(7) if only_last.due(s, last_step=s == 6)] == [6]
    both_ends = Periodic("val bpb", 0, lambda s: None, at_start=True)
    assert [s for s in range(7) if both_ends.due(s, last_step=s == 6)] == [0, 6]
