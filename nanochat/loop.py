"""
The training loop and its step that pretraining, midtraining, SFT and RL all run; they differ only in what they pass in
(data, horizon, schedule, evaluations, hyperparameters). State that must survive a resume is one dict,
`loop_state` in the checkpoint meta; a meta without it (an older run, or upstream's format) resumes with fresh meters.
"""

import gc
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from nanochat import training  # by module: tests swap its functions (one CPU thread for the golden curve)
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import (DummyWandb, UserError, atomic_write, autodetect_device_type, compute_cleanup, compute_init,
                             dist_world_size, get_base_dir, get_compute_dtype, get_dist_info, get_peak_flops,
                             measure_matmul_flops, print_banner, strict_json, usable_cores)
from nanochat.dataloader import gather_loader_states
from nanochat.engine import model_device

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# What the loop is told


@dataclass
class Periodic:
    """`fn(step) -> dict of metrics or None`, run before the step every `every` steps (<= 0: none in between),
    at step 0 if `at_start` and at the last step if `at_last`. `master_only` work (rank 0 alone) uses no collectives."""

    name: str
    every: int
    fn: Callable
    at_start: bool = False
    at_last: bool = True
    master_only: bool = False

    def due(self, step, last_step):
        if last_step:
            return self.at_last
        if step == 0:
            return self.at_start
        return self.every > 0 and step % self.every == 0


@dataclass
class Checkpointer:
    """Saves every `every` steps and after the last one; `meta` is what the stage records beside the loop and
    loader state. Saving is collective: every rank calls it."""

    checkpoint_dir: str
    every: int
    model: torch.nn.Module
    optimizer: object
    meta: dict = field(default_factory=dict)

    def due(self, step, last_step, resume_step):
        # Never re-save the step we resumed from: it is on disk already.
        return last_step or (step > 0 and step != resume_step and self.every > 0 and step % self.every == 0)

    def save(self, step, loop_state, metrics, loader_state):
        meta = dict(step=step, **{k: v for k, v in metrics.items() if k == "val_bpb"}, **self.meta,
                    dataloader_state_dict=loader_state, loop_state=loop_state)
        save_checkpoint(self.checkpoint_dir, step, self.model.state_dict(), self.optimizer.state_dict(), meta, rank=get_dist_info()[1])


@dataclass
class LoopResult:
    step: int
    metrics: dict
    min_val_bpb: float | None
    total_time: float
    avg_tok_per_sec: float | None
    last_mfu: float | None
    peak_memory_mib: float | None

    def report_rows(self):
        fmt = lambda v, f: f.format(v) if v is not None else "n/a"  # noqa: E731
        return {"Minimum validation bpb": self.min_val_bpb, "Final validation bpb": self.metrics.get("val_bpb"),
                "MFU %": fmt(self.last_mfu, "{:.2f}%"), "Total training time": f"{self.total_time / 60:.2f}m",
                "Average tok/sec": fmt(self.avg_tok_per_sec, "{:,.0f}"), "Peak memory usage": fmt(self.peak_memory_mib, "{:.2f}MiB")}


# -----------------------------------------------------------------------------
# The step, top to bottom: TrainLoop.run's step block calls TrainStep on TrainLoop._micro_batches (right after
# TrainStep), which fetches each micro-batch and, during its backward, records its loader state and prefetches.


class NonFiniteLossError(UserError):
    """A training loss was NaN or inf on some rank: every rank stops before the optimizer spreads it."""


@dataclass
class StepResult:
    loss: float  # mean training loss over every micro-batch of every rank
    tokens: int = 0  # target positions in this step over all ranks (padding included)
    skipped: bool = False  # fp16: the GradScaler found inf/NaN gradients and every rank skipped the update


def apply_schedule(optimizer, lrm, momentum=None, weight_decay=None):
    """Set every group's lr to initial_lr * lrm; Muon groups also get the scheduled momentum and WD."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm  # from initial_lr: one step's multiplier never compounds into the next
        if group.get("kind") == "muon":  # AdamW groups keep their own betas and weight decay
            if momentum is not None:
                group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay


def _loss_verdict(losses):
    """Start the all-reduce of [loss sum, non-finite count, loss count] over all ranks; returns a wait for them."""
    stacked = torch.stack(losses).float()
    finite = torch.isfinite(stacked)
    totals = torch.stack([torch.where(finite, stacked, 0.0).sum(), (~finite).sum().float(),  # a NaN stays out of the sum
                          torch.tensor(float(len(losses)), device=stacked.device)])
    totals = training._all_reduce(totals, dist.ReduceOp.SUM)  # one collective carries the logged loss and the NaN decision
    if not totals.is_cuda:
        return totals.tolist
    # Queued before the last backward, the copy is done before that backward starts, so the host's wait ends while the
    # GPU runs it; a wait queued after the backward would drain the GPU's queue every step.
    host = torch.empty(totals.shape, dtype=totals.dtype, pin_memory=True)  # pinned: the copy does not block the host
    host.copy_(totals, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait():
        done.synchronize()  # the copy, not the backward queued after it
        return host.tolist()

    return wait


class TrainStep:
    """One optimizer step over `grad_accum_steps` micro-batches. loss_fn(model, inputs, targets) -> the micro-batch's
    mean loss; scaler: a GradScaler on the fp16 path; oom_hint: the fix an out-of-memory error names."""

    def __init__(self, model, optimizer, grad_accum_steps, scaler=None, loss_fn=None, oom_hint=""):
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.grad_accum_steps = grad_accum_steps
        self.loss_fn = loss_fn or (lambda model, inputs, targets: model(inputs, targets))
        self.oom_hint = oom_hint

    def __call__(self, micro_batches, lrm=1.0, momentum=None, weight_decay=None):
        """Train on `micro_batches` ((inputs, targets), exactly grad_accum_steps) at the scheduled hyperparameters."""
        apply_schedule(self.optimizer, lrm, momentum=momentum, weight_decay=weight_decay)
        losses, tokens = [], 0
        try:
            # The next micro-batch is asked for only after a backward is queued: its fetch overlaps that backward.
            for micro_step, (inputs, targets) in enumerate(micro_batches):
                loss = self.loss_fn(self.model, inputs, targets)
                losses.append(loss.detach())  # every micro-batch's loss goes into the NaN verdict, not just the last
                tokens += inputs.numel()
                if micro_step == self.grad_accum_steps - 1:
                    verdict = _loss_verdict(losses)  # queued before the last backward, so its wait overlaps that backward
                loss = loss / self.grad_accum_steps  # mean of the micro-batch means: one big batch's gradient at equal sizes
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()  # fp16: scaled against underflow
        except torch.OutOfMemoryError as err:
            self.model.zero_grad(set_to_none=True)  # give the partial gradients' memory back before the error unwinds
            raise training.OutOfMemory(f"out of memory on {inputs.device} in a training step at {inputs.size(0)} rows x "
                                       f"{inputs.size(1)} tokens per micro-batch; {self.oom_hint or 'lower --device-batch-size'}") from err
        loss_sum, bad, count = verdict()
        if bad > 0:  # on any rank: every rank got the same sums, so all of them stop here, before the weights change
            self.model.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the training loss was NaN/inf in {int(bad)} of {int(count)} micro-batches "
                                     "(over all ranks); stopped before the optimizer step, so the last checkpoint "
                                     "is good. Try a lower learning rate, or NANOCHAT_DTYPE=float32")
        skipped = False
        if self.scaler is not None:  # fp16
            self.scaler.unscale_(self.optimizer)  # true gradients, and this rank's found-inf flags
            found = self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"]
            for flag in found.values():
                training._all_reduce(flag, dist.ReduceOp.MAX)  # one rank's overflow makes every rank skip, or none would be in step
            skipped = any(flag.item() > 0 for flag in found.values())
            self.scaler.step(self.optimizer)  # skips the update when found-inf is set (now on every rank)
            self.scaler.update()  # a smaller scale after an overflow, a larger one after a run of clean steps
        else:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)  # None, not zeros: the memory is free until the next backward
        return StepResult(loss=loss_sum / count, tokens=tokens * dist_world_size(), skipped=skipped)


# -----------------------------------------------------------------------------
# The loop


class TrainLoop:
    """Runs a stage's training; it fetches the micro-batches it hands the step and keeps the loader state a
    checkpoint records. `horizon`: a number of optimizer steps, or `fn(loader state) -> (progress, last)` (mid/SFT:
    until the data is consumed once). `describe(state)` runs on every rank after each step (it may use collectives)
    and returns text for the step line, or a dict of metrics also sent to wandb and the curves. prefetch=False
    fetches each micro-batch only when needed (RL samples its batches from the weights the last step updated).
    checkpointer=None saves nothing (--dry-run)."""

    def __init__(self, *, step, batches, horizon, schedule, periodic, checkpointer, meter, wandb_run,
                 prefetch=True, describe=None, wandb_every=100, sync=None, curve=None):
        self.train_step, self.batches, self.horizon, self.schedule = step, batches, horizon, schedule
        self.num_iterations = horizon if isinstance(horizon, int) else None  # for the step line's "of N"
        self.periodic, self.checkpointer, self.meter, self.wandb_run = periodic, checkpointer, meter, wandb_run
        self.prefetch, self.describe = prefetch, describe or (lambda state: "")
        self.wandb_every, self.sync = wandb_every, sync
        self.curve = curve  # stage name: rank 0 writes the loss / val bpb curves to <base>/report/curves/<curve>.json
        self.rank = get_dist_info()[1]
        self.pending = None  # (inputs, targets, loader state) fetched ahead: the first micro-batch of the next step
        self.trained_state = None  # loader state after the last micro-batch trained on: a resumed loader goes on from it

    def _micro_batches(self, n):
        # The step asks for the next micro-batch after queueing a backward: the prefetch runs while the device computes.
        for _ in range(n):
            inputs, targets, state = self.pending or next(self.batches)  # fetched ahead, else now (prefetch=False)
            self.pending = None
            yield inputs, targets
            self.trained_state = state  # reached when the step asks for more, i.e. after this micro-batch's backward
            if self.prefetch:
                self.pending = next(self.batches)  # may overwrite the loader's buffers: the backward is queued already

    def position(self):
        # The pending batch's loader state, if any: mid/SFT stop when the pending batch is past the data.
        return self.pending[2] if self.pending is not None else self.trained_state

    def progress(self, step):
        """(progress in [0, 1], last_step) before step `step`; every rank gets the same last_step."""
        if self.num_iterations is not None:
            return step / self.num_iterations, step >= self.num_iterations
        progress, last = self.horizon(self.position())
        # Ranks may run out at different batches: all stop when one does, none waits alone in a collective.
        return progress, not training._everywhere(not last, model_device(self.train_step.model))

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
            self.trained_state = resume.get("dataloader_state_dict")  # where the resumed loader starts
        if self.prefetch:
            self.pending = next(self.batches)  # the first batch, so the horizon can read its loader state
        first_step = step
        lrm, last = 1.0, None

        while True:
            progress, last_step = self.progress(step)
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
            if self.checkpointer is not None and self.checkpointer.due(step, last_step, resume_step):
                loop_state = dict(step=step, progress=progress, min_val_bpb=None if min_val_bpb == float("inf") else min_val_bpb,
                                  meter=self.meter.state_dict(), metrics=_scalars(metrics))
                # The state after the last batch trained on, not the pending one's: the resumed loader yields the
                # pending batch again, which this run fetched but never trained on.
                self.checkpointer.save(step, loop_state, metrics, _gather(self.trained_state))

            if last_step:
                break

            # the step: TrainStep.__call__ and _micro_batches above
            sched = self.schedule(step, progress)  # lrm, and base_train's Muon momentum and weight decay
            lrm = sched["lrm"]
            self.meter.start(self.sync)  # CUDA: after the queued evals finish, so they are not timed as the step
            result = self.train_step(self._micro_batches(self.train_step.grad_accum_steps), **sched)
            last = self.meter.stop(step, result.loss, progress, self.sync, tokens=result.tokens)  # synced: dt counts the device work

            history["train_loss"].append([step, last["loss"]])
            extra = self.describe(self.position())
            if isinstance(extra, dict):  # step metrics of the stage's own (RL's reward): logged, plotted, sent to wandb
                for key, value in extra.items():
                    history.setdefault(key, []).append([step, value])
                self.wandb_run.log({"step": step, **{f"train/{k}": v for k, v in extra.items()}})
                extra = " | ".join(f"{k}: {v:.4f}" for k, v in extra.items())
            if result.skipped:
                extra = (extra + " | " if extra else "") + "fp16 overflow: update skipped"
            log.info(self.meter.format_line(step, self.num_iterations, progress, last, lrm, extra))
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
    """<base>/report/curves/<name>.json: this run's train loss (debiased EMA) and val bpb by step."""
    path = os.path.join(get_base_dir(), "report", "curves", f"{name}.json")
    if resumed_from is not None and os.path.exists(path):  # the steps before the resume are in the file this one replaces
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        for key in history:
            history[key] = [p for p in old.get(key, []) if p[0] < resumed_from] + history[key]
    atomic_write(path, strict_json({"stage": name, **history}))


def _scalars(metrics):  # the JSON-friendly part of a metrics dict
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, dict, type(None)))}


def _gather(state):
    # Every rank's loader state in one object for rank 0's meta file (a collective under torch.distributed).
    if state is None or "ranks" in state:  # nothing, or already gathered (the state a resume started from)
        return state
    return gather_loader_states(state)


# -----------------------------------------------------------------------------
# Start-up that every stage shares


@dataclass
class Run:
    rank: int
    world_size: int
    device: torch.device
    compute_dtype: torch.dtype
    peak_flops: float | None
    mfu_label: str  # what peak_flops is (training.mfu_label), for the step line
    wandb_run: object
    sync: Callable | None

    def meter(self, tokens_per_step, flops_per_token):
        return training.StepMeter(tokens_per_step, flops_per_token, self.peak_flops, mfu_label=self.mfu_label)

    def finish(self):
        self.wandb_run.finish()
        compute_cleanup()


def token_batch_step(run, model, optimizer, device_batch_size, total_batch_size, seq_len, vocab_size):
    """(TrainStep, device batch size) of the stages that train on token rows (base, mid, SFT)."""
    B = training.resolve_device_batch_size(device_batch_size, training.CPU_DEVICE_BATCH_SIZE, model, optimizer, total_batch_size, seq_len,
                                  run.world_size, vocab_size, run.device, log=log.info)
    accum = training.grad_accum_steps_for(total_batch_size, B, seq_len, run.world_size)
    log.info("Device batch %d x %d tokens, total batch size %s => gradient accumulation steps: %d", B, seq_len,
             f"{total_batch_size:,}", accum)
    scaler = torch.amp.GradScaler() if run.compute_dtype == torch.float16 else None  # bf16 and fp32 need no loss scaling
    return TrainStep(model, optimizer, accum, scaler=scaler,
                     oom_hint=f"lower --device-batch-size (now {B}; gradient accumulation keeps the total batch)"), B


def start_run(device_type, seed, wandb_project, run_name, user_config):
    """Join the process group, seed, pick threads and dtype, open wandb (rank 0); device_type "" = autodetect."""
    _, rank, _, world_size, device = compute_init(device_type or autodetect_device_type(), seed=seed)
    if device.type == "cpu":
        threads = training.configure_cpu_threads(max(1, usable_cores() // world_size))  # oversubscribed matmul threads only thrash
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
        peak = measure_matmul_flops(device, compute_dtype)  # no datasheet number: this device's measured rate
        log.info("%s: measured %s matmul rate %.3e FLOP/s (used as the MFU peak)", device.type.upper(),
                 str(compute_dtype).removeprefix("torch."), peak)
    wandb_run = DummyWandb()
    if run_name != "dummy" and rank == 0:
        import wandb

        wandb_run = wandb.init(project=wandb_project, name=run_name, config=user_config)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return Run(rank, world_size, device, compute_dtype, peak * world_size if peak else None,
               training.mfu_label(device.type, compute_dtype), wandb_run, sync)
