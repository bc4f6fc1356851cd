"""
The training loop that pretraining, midtraining, SFT and RL all run; they differ only in what they pass in
(data, horizon, schedule, evaluations, hyperparameters).

    loop = TrainLoop(step=TrainStep(model, optimizer, grad_accum_steps), batches=loader,
                     horizon=FixedHorizon(num_iterations), schedule=lambda step, progress: {"lrm": 1.0},
                     periodic=[Periodic("val", every=250, fn=evaluate, at_start=True)],
                     checkpointer=Checkpointer(checkpoint_dir, every=-1, model=orig_model, optimizer=optimizer,
                                               meta={"model_config": ..., "user_config": ...}),
                     meter=StepMeter(...), wandb_run=wandb_run)
    result = loop.run(resume=meta_or_None)

One iteration, top to bottom: decide whether this is the last step (all ranks agree), run whatever is due
(evaluations, samples), save a checkpoint if due, stop after the last one, then schedule the optimizer's
hyperparameters, take the step, log it. The loop runs num_iterations + 1 times: the extra pass at
step == num_iterations only evaluates and saves the final weights.

State that must survive a resume is one dict, `loop_state` in the checkpoint meta (step, the loader state
of the pending batch, meters, last metrics). A meta without it (an older run, or upstream's format)
resumes with fresh meters.
"""

import gc
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import dist_world_size, get_dist_info
from nanochat.training import apply_schedule

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# What the loop is told


@dataclass
class FixedHorizon:
    """Exactly `num_iterations` optimizer steps (pretraining, RL, or --num-iterations)."""

    num_iterations: int

    def __call__(self, step, state):
        """(progress in [0, 1], last_step) before step `step`; `state` is the pending batch's loader state."""
        return step / self.num_iterations, step >= self.num_iterations

    total = property(lambda self: self.num_iterations)


@dataclass
class DataHorizon:
    """Until the loader has consumed its data once (mid/SFT default): `progress_fn(state) -> (progress, last)`.

    Every rank reads its own share, so ranks may run out at different batches: last_step is all-reduced (MAX)
    so that all of them stop at the same step and none waits alone in a collective. `device` is the run's
    device: NCCL refuses a flag tensor left on the CPU.
    """

    progress_fn: Callable
    device: torch.device

    def __call__(self, step, state):
        progress, last = self.progress_fn(state)
        if dist_world_size() > 1:
            flag = torch.tensor(int(last), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            last = bool(flag.item())
        return progress, last

    total = None


@dataclass
class Periodic:
    """Something done once in a while, before the step: `fn(step) -> dict of metrics or None`.

    Runs every `every` steps (every <= 0: never), at step 0 only if `at_start`, and at the last step if
    `at_last`. `master_only` work (samples) runs on rank 0 alone, so it must not use collectives.
    """

    name: str
    every: int
    fn: Callable
    at_start: bool = False
    at_last: bool = True
    master_only: bool = False

    def due(self, step, last_step):
        if self.every <= 0:
            return False
        if last_step:
            return self.at_last
        if step == 0:
            return self.at_start
        return step % self.every == 0


@dataclass
class Checkpointer:
    """Saves model + this rank's optimizer shard + meta (rank 0) every `every` steps and after the last step.

    meta: what this stage records beside the loop state (model_config with window_pattern, user_config,
    batch geometry, ...). Saving is collective: every rank calls it.
    """

    checkpoint_dir: str
    every: int
    model: torch.nn.Module
    optimizer: object
    meta: dict = field(default_factory=dict)
    save_optimizer: bool = True

    def due(self, step, last_step, resume_step):
        # Never re-save the step we resumed from: it is on disk already.
        return last_step or (step > 0 and step != resume_step and self.every > 0 and step % self.every == 0)

    def save(self, step, loop_state, metrics):
        meta = dict(step=step, **{k: v for k, v in metrics.items() if k == "val_bpb"}, **self.meta, loop_state=loop_state)
        optim = self.optimizer.state_dict() if self.save_optimizer else None
        save_checkpoint(self.checkpoint_dir, step, self.model.state_dict(), optim, meta, rank=get_dist_info()[1])


@dataclass
class LoopResult:
    """What a finished run reports: last metrics of every periodic job, minimum val bpb, time, speed, memory."""

    step: int
    metrics: dict
    min_val_bpb: float | None
    total_time: float
    avg_tok_per_sec: float | None
    last_mfu: float | None
    peak_memory_mib: float | None

    def report_rows(self):
        """The stage-independent rows of a report section."""
        fmt = lambda v, f: f.format(v) if v is not None else "n/a"  # noqa: E731
        return {"Minimum validation bpb": self.min_val_bpb, "Final validation bpb": self.metrics.get("val_bpb"),
                "MFU %": fmt(self.last_mfu, "{:.2f}%"), "Total training time": f"{self.total_time / 60:.2f}m",
                "Average tok/sec": fmt(self.avg_tok_per_sec, "{:,.0f}"), "Peak memory usage": fmt(self.peak_memory_mib, "{:.2f}MiB")}


# -----------------------------------------------------------------------------
# The loop


class TrainLoop:
    """Runs a stage's training (see the module docstring). `describe(state)` runs on every rank after each
    step (it may use collectives) and returns text for the step line (the data position), or a dict of
    metrics, which also go to wandb and to the curves; `wandb_every` sets how often the loss goes to wandb."""

    def __init__(self, *, step, batches, horizon, schedule, periodic, checkpointer, meter, wandb_run,
                 describe=None, wandb_every=100, sync=None, curve=None):
        self.step_fn, self.batches, self.horizon, self.schedule = step, batches, horizon, schedule
        self.periodic, self.checkpointer, self.meter, self.wandb_run = periodic, checkpointer, meter, wandb_run
        self.describe = describe or (lambda state: "")
        self.wandb_every, self.sync = wandb_every, sync
        self.curve = curve  # stage name: rank 0 writes the loss / val bpb curves to <base>/report/curves/<curve>.json
        self.rank = get_dist_info()[1]

    def run(self, resume=None):
        """Train from step 0, or from a checkpoint's meta (`resume`); returns a LoopResult."""
        step, metrics, min_val_bpb = 0, {}, float("inf")
        resume_step = -1
        history = {"train_loss": [], "val_bpb": []}  # [step, value] pairs for the report's plots
        if resume is not None:
            resume_step = step = resume["step"]
            loop_state = resume.get("loop_state") or {}
            if "meter" in loop_state:
                self.meter.load_state_dict(loop_state["meter"])
            else:
                log.warning("The checkpoint of step %d has no loop state (an older or foreign format): "
                            "the loss average, timing and best val bpb start fresh", step)
            metrics = dict(loop_state.get("metrics") or {})
            if resume.get("val_bpb") is not None:
                metrics.setdefault("val_bpb", resume["val_bpb"])
            best = loop_state.get("min_val_bpb")
            min_val_bpb = float("inf") if best is None else best
        if resume is not None:
            self.step_fn.state = resume.get("dataloader_state_dict")  # where the resumed loader starts
        if self.step_fn.prefetch:
            self.step_fn.fetch(self.batches)  # the first batch, so the horizon can read its loader state
        first_step = step
        lrm, last = 1.0, None

        while True:
            progress, last_step = self.horizon(step, self.step_fn.state)
            flops_so_far = self.meter.flops_per_token * self.meter.tokens_per_step * step

            # once in a while: evaluations and samples (before the step, so step 0 sees the initial model)
            for job in self.periodic:
                if not job.due(step, last_step) or (job.master_only and self.rank != 0):
                    continue
                out = job.fn(step) or {}
                metrics.update(out)
                if "val_bpb" in out and out["val_bpb"] is not None:
                    min_val_bpb = min(min_val_bpb, out["val_bpb"])
                    history["val_bpb"].append([step, out["val_bpb"]])
                if out:
                    self.wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                                        "total_training_time": self.meter.total_time, **_scalars(out)})

            # once in a while: a checkpoint (every rank writes its optimizer shard)
            if self.checkpointer.due(step, last_step, resume_step):
                loop_state = dict(step=step, progress=progress, min_val_bpb=None if min_val_bpb == float("inf") else min_val_bpb,
                                  meter=self.meter.state_dict(), metrics=_scalars(metrics))
                self.checkpointer.meta["dataloader_state_dict"] = _gather(self.step_fn.resume_state)
                self.checkpointer.save(step, loop_state, metrics)

            if last_step:
                break

            # the step
            sched = self.schedule(step, progress)
            lrm = sched["lrm"]
            apply_schedule(self.step_fn.optimizer, lrm, momentum=sched.get("momentum"), weight_decay=sched.get("weight_decay"))
            self.meter.start(self.sync)
            result = self.step_fn(self.batches)
            last = self.meter.stop(step, result.loss, progress, self.sync, tokens=result.tokens)

            history["train_loss"].append([step, last["loss"]])
            extra = self.describe(self.step_fn.state)
            if isinstance(extra, dict):  # step metrics of the stage's own (RL's reward): logged, plotted, sent to wandb
                for key, value in extra.items():
                    history.setdefault(key, []).append([step, value])
                self.wandb_run.log({"step": step, **{f"train/{k}": v for k, v in extra.items()}})
                extra = " | ".join(f"{k}: {v:.4f}" for k, v in extra.items())
            if result.skipped:
                extra = (extra + " | " if extra else "") + "fp16 overflow: update skipped"
            log.info(self.meter.format_line(step, self.horizon.total, progress, last, lrm, extra))
            if step % self.wandb_every == 0:
                self.wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": self.meter.total_time,
                                    "train/loss": last["loss"], "train/lrm": lrm, "train/dt": last["dt"],
                                    "train/tok_per_sec": last["tok_per_sec"], "train/mfu": last["mfu"]})

            # Python's GC walks the large, long-lived object graph every few hundred ms; after the first
            # step of this run nothing new needs tracing, so freeze what exists and turn it off.
            step += 1
            if step == first_step + 1:
                gc.collect()
                gc.freeze()
                gc.disable()
            elif step % 5000 == 0:
                gc.collect()

        gc.enable()
        if self.curve and self.rank == 0:
            _write_curve(self.curve, history, resumed_from=None if resume is None else resume_step)
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        result = LoopResult(step=step, metrics=metrics, min_val_bpb=None if min_val_bpb == float("inf") else min_val_bpb,
                            total_time=self.meter.total_time, avg_tok_per_sec=self.meter.avg_tok_per_sec(),
                            last_mfu=last["mfu"] if last else None, peak_memory_mib=peak)
        log.info("Peak memory usage: %s", f"{peak:.2f}MiB" if peak is not None else "n/a (not CUDA)")
        log.info("Total training time: %.2fm | average tok/sec: %s", result.total_time / 60,
                 f"{result.avg_tok_per_sec:,.0f}" if result.avg_tok_per_sec else "n/a")
        if result.min_val_bpb is not None:
            log.info("Minimum validation bpb: %.6f", result.min_val_bpb)
        return result


def _write_curve(name, history, resumed_from):
    """<base>/report/curves/<name>.json: this run's train loss (debiased EMA) and val bpb by step.

    A resumed run starts its curve at the resume step; the steps before it are in the curve file of the run
    it resumed, which this one replaces, so they are carried over from it when it is there.
    """
    from nanochat.common import atomic_write, get_base_dir, strict_json

    path = os.path.join(get_base_dir(), "report", "curves", f"{name}.json")
    if resumed_from is not None and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        for key in history:
            history[key] = [p for p in old.get(key, []) if p[0] < resumed_from] + history[key]
    atomic_write(path, strict_json({"stage": name, **history}))


def _scalars(metrics):
    """The JSON-friendly part of a metrics dict (numbers, strings, None; nested dicts kept)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, dict, type(None)))}


def _gather(state):
    """Every rank's loader state in one object for rank 0's meta file (a collective under torch.distributed)."""
    if state is None or "ranks" in state:  # nothing, or already gathered (the state a resume started from)
        return state
    from nanochat.dataloader import gather_loader_states

    return gather_loader_states(state)


def model_config_meta(model):
    """The complete model config for a checkpoint meta (window_pattern included)."""
    return asdict(model.config)


# -----------------------------------------------------------------------------
# Start-up that every stage shares


@dataclass
class Run:
    """The process's place in the run: device, ranks, dtype, MFU peak, wandb."""

    ddp: bool
    rank: int
    world_size: int
    device: torch.device
    compute_dtype: torch.dtype
    peak_flops: float | None
    mfu_label: str  # what peak_flops is (training.mfu_label), for the step line
    wandb_run: object
    sync: Callable | None

    @property
    def master(self):
        return self.rank == 0


def start_run(device_type, seed, wandb_project, run_name, user_config):
    """Join the process group, seed, pick threads and dtype, log what was chosen, open wandb (rank 0).

    device_type: "" = autodetect. On CPU the cores are split between ranks: oversubscribed matmul
    threads only thrash. MFU's peak is the GPU's datasheet bf16 number, or this CPU's measured rate.
    """
    from nanochat.common import (DummyWandb, autodetect_device_type, compute_init, get_compute_dtype, get_peak_flops,
                                 measure_matmul_flops, print_banner, usable_cores)
    from nanochat.training import configure_cpu_threads, mfu_label

    ddp, rank, _, world_size, device = compute_init(device_type or autodetect_device_type(), seed=seed)
    if device.type == "cpu":
        threads = configure_cpu_threads(max(1, usable_cores() // world_size))
        log.info("CPU: %d torch threads per rank, denormals flushed to zero", threads)
    if rank == 0:
        print_banner()
    compute_dtype, reason = get_compute_dtype()
    log.info("Compute dtype: %s (%s)", compute_dtype, reason)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = get_peak_flops(name)
        log.info("GPU: %s | peak bf16 FLOP/s: %s", name, f"{peak:.3e}" if peak else "n/a (unknown card)")
    else:
        peak = measure_matmul_flops(device, compute_dtype)
        log.info("%s: measured %s matmul rate %.3e FLOP/s (used as the MFU peak)", device.type.upper(),
                 str(compute_dtype).removeprefix("torch."), peak)
    wandb_run = DummyWandb()
    if run_name != "dummy" and rank == 0:
        import wandb

        wandb_run = wandb.init(project=wandb_project, name=run_name, config=user_config)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return Run(ddp, rank, world_size, device, compute_dtype, peak * world_size if peak else None,
               mfu_label(device.type, compute_dtype), wandb_run, sync)
