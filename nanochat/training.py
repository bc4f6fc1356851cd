"""
Training-loop pieces that every training stage (base, mid, SFT) shares, each in one place:
the scaling rules that turn `--depth` into batch size / LR / weight decay, the LR / momentum /
weight-decay schedules, the gradient-accumulation step (with NaN detection and CUDA out-of-memory
recovery), and the loss / throughput / MFU / ETA bookkeeping behind the step log line.

Everything here is a plain function or a small class; scripts/ wire them together.
"""

import math
import os
import time
from dataclasses import dataclass, field

import torch

# Reference batch for the LR / WD scaling rules: 2^19 tokens, the batch the base LRs were tuned at.
B_REF = 2**19


# -----------------------------------------------------------------------------
# CPU runtime settings


def configure_cpu_threads(num_threads=None):
    """Thread and float settings for training on CPU; returns the intra-op thread count in use.

    num_threads: torch intra-op threads; None = every core this process may run on (its affinity mask,
    which os.cpu_count() ignores under taskset/cgroups). More threads than cores only adds context
    switches to every matmul. Denormals are flushed to zero: tiny gradients (e.g. of rarely seen
    embedding rows in the AdamW moments) otherwise take the slow microcode path on x86.
    """
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    torch.set_num_threads(num_threads)
    torch.set_flush_denormal(True)
    return num_threads


# -----------------------------------------------------------------------------
# Scaling rules


def config_for_depth(depth, aspect_ratio=64, head_dim=128, max_seq_len=2048, window_pattern="SSSL", vocab_size=32768):
    """GPTConfig from the depth dial: width = depth * aspect_ratio rounded UP to a multiple of head_dim,
    so the head dim is exactly `head_dim` (FA3 wants it a multiple of 8) even for odd depths."""
    from nanochat.gpt import GPTConfig

    model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
    num_heads = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=window_pattern)


@dataclass
class ScalingPlan:
    """What `--depth` and the horizon flags resolve to (everything base_train prints at startup)."""

    total_batch_size: int
    batch_lr_scale: float
    weight_decay: float
    num_iterations: int
    target_tokens: int


def auto_total_batch_size(target_tokens, ref_tokens):
    """Nearest power of two to B_REF * (D / D_ref)^0.383 (Power Lines, arXiv 2505.13738: B_opt ∝ D^0.383)."""
    predicted = B_REF * (target_tokens / ref_tokens) ** 0.383
    return 2 ** round(math.log2(predicted))


def scaling_plan(scaling_params, ref_scaling_params, flops_per_token, total_batch_size=-1,
                 num_iterations=-1, target_flops=-1.0, target_param_data_ratio=12.0, weight_decay=0.28):
    """Resolve batch size, LR scale, weight decay and horizon the way base_train does.

    scaling_params: the model's transformer matrices + lm_head (GPT.num_scaling_params()["total"]-style
    count used for the data:param ratio); ref_scaling_params: the same for d12 with the same flags.
    The batch size and WD depend only on the ratio of the two (the data ratio cancels), so they work
    in --target-flops mode too.
    """
    if num_iterations <= 0 and target_flops <= 0 and target_param_data_ratio <= 0:
        raise ValueError("no training horizon: set one of --num-iterations, --target-flops or --target-param-data-ratio to a positive value")
    target_tokens = int(target_param_data_ratio * scaling_params)
    ref_tokens = target_param_data_ratio * ref_scaling_params
    if total_batch_size == -1:
        total_batch_size = auto_total_batch_size(target_tokens, ref_tokens)
    # sqrt rule for LR vs batch size (used for Muon too, as an assumption).
    batch_lr_scale = math.sqrt(total_batch_size / B_REF)
    # T_epoch framework (arXiv 2405.13698): keep B / (lr * wd * D) constant across scales.
    weight_decay_scaled = weight_decay * batch_lr_scale * (ref_tokens / target_tokens)
    if num_iterations > 0:
        iters = num_iterations
    elif target_flops > 0:
        iters = round(target_flops / (flops_per_token * total_batch_size))
    else:
        iters = target_tokens // total_batch_size
    if iters <= 0:
        raise ValueError(f"the training horizon resolves to {iters} steps (target tokens {target_tokens:,} < batch {total_batch_size:,}); "
                         "raise --target-param-data-ratio, or set --num-iterations or a smaller --total-batch-size")
    return ScalingPlan(total_batch_size, batch_lr_scale, weight_decay_scaled, iters, target_tokens)


def grad_accum_steps_for(total_batch_size, device_batch_size, seq_len, world_size):
    """Micro-batches per optimizer step; the global batch must split evenly across ranks and rows."""
    world_tokens = device_batch_size * seq_len * world_size
    if total_batch_size % world_tokens != 0:
        raise ValueError(f"--total-batch-size {total_batch_size:,} is not divisible by device_batch_size*max_seq_len*world_size = "
                         f"{device_batch_size}*{seq_len}*{world_size} = {world_tokens:,}; change --device-batch-size or --total-batch-size")
    return total_batch_size // world_tokens


# -----------------------------------------------------------------------------
# Schedules (it = step, N = number of optimizer steps; the last trained step is N-1)


def lr_multiplier(it, num_iterations, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05):
    """Linear warmup over `warmup_steps`, flat, then linear warmdown to `final_lr_frac` over the last fraction."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it, num_iterations, warmdown_ratio=0.65):
    """0.85 -> 0.97 over the first 400 steps, held, then 0.97 -> 0.90 across the LR warmdown."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(it, num_iterations, weight_decay):
    """Cosine decay of the Muon weight decay from its scaled value to 0 at the end of training."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def apply_schedule(optimizer, lrm, momentum=None, weight_decay=None):
    """Set every group's lr to initial_lr * lrm; Muon groups also get the scheduled momentum and WD."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay


# -----------------------------------------------------------------------------
# The optimizer step


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or inf; the run must stop before the optimizer spreads it."""


def _is_cuda_oom(err):
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError) and "CUDA out of memory" in str(err))


@dataclass
class TrainStep:
    """One optimizer step over a list of micro-batches, with gradient accumulation.

    `splits` cuts each micro-batch into that many row chunks. It starts at 1 and doubles when CUDA
    runs out of memory, which halves the effective device batch and doubles the accumulation steps
    while every step still sees exactly the same data (so the loss curve is unaffected).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object = None  # torch.amp.GradScaler on the fp16 path
    splits: int = 1
    log: object = print
    oom_retries: int = field(default=0)

    def __call__(self, micro_batches):
        """Run forward/backward over `micro_batches` [(x, y), ...] and step the optimizer. Returns the last loss (float)."""
        while True:
            try:
                loss = self._accumulate(micro_batches)
                break
            except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                if not _is_cuda_oom(err):
                    raise
                rows = micro_batches[0][0].size(0)
                if self.splits * 2 > rows:
                    raise RuntimeError(f"CUDA out of memory even at 1 row per micro-batch; use a smaller model or --max-seq-len") from err
                self.model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                self.splits *= 2
                self.oom_retries += 1
                self.log(f"CUDA out of memory: halving the device batch to {rows // self.splits} rows "
                         f"(gradient accumulation x{self.splits}) and retrying this step")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return loss

    def _accumulate(self, micro_batches):
        n = len(micro_batches) * self.splits
        last = None
        for x, y in micro_batches:
            for xs, ys in zip(x.chunk(self.splits), y.chunk(self.splits)):
                loss = self.model(xs, ys)
                last = loss.detach()
                loss = loss / n
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        value = last.item()
        if not math.isfinite(value):
            self.model.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"training loss is {value}; stopping before the optimizer step so the last checkpoint stays good. "
                                     "Try a lower learning rate, or a different --device-type / NANOCHAT_DTYPE")
        return value


# -----------------------------------------------------------------------------
# Bookkeeping for the step log line


@dataclass
class StepMeter:
    """EMA of the loss (debiased), tok/s, MFU and ETA. Steps before `warmup` are left out of the timing (compile warm-up)."""

    num_iterations: int
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None  # aggregate over all ranks; None = unknown (MFU shown as n/a)
    smooth_loss: float = 0.0
    total_time: float = 0.0
    timed_steps: int = 0
    warmup: int = 10
    _t0: float = 0.0

    def start(self, sync=None):
        if sync:
            sync()
        self._t0 = time.perf_counter()

    def stop(self, step, loss, sync=None):
        """Record step `step` with its loss; returns a dict of the step's metrics."""
        if sync:
            sync()
        dt = time.perf_counter() - self._t0
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss
        debiased = self.smooth_loss / (1 - 0.9 ** (step + 1))
        if step > self.warmup:
            self.total_time += dt
            self.timed_steps += 1
        tok_per_sec = self.tokens_per_step / dt
        flops_per_sec = self.flops_per_token * self.tokens_per_step / dt
        mfu = 100 * flops_per_sec / self.peak_flops if self.peak_flops else None
        eta = (self.num_iterations - step) * self.total_time / self.timed_steps if self.timed_steps else None
        return dict(loss=debiased, dt=dt, tok_per_sec=tok_per_sec, flops_per_sec=flops_per_sec, mfu=mfu, eta=eta)

    def avg_tok_per_sec(self):
        return self.tokens_per_step * self.timed_steps / self.total_time if self.total_time > 0 else None

    def state_dict(self):
        return dict(smooth_loss=self.smooth_loss, total_time=self.total_time, timed_steps=self.timed_steps)

    def load_state_dict(self, state):
        self.smooth_loss = state["smooth_loss"]
        self.total_time = state["total_time"]
        self.timed_steps = state["timed_steps"]


def format_step_line(step, num_iterations, m, lrm, extra="", total_time=0.0):
    """The one-line step log: step, loss, lrm, dt, tok/s, MFU, data position, total time, ETA."""
    pct = 100 * step / num_iterations
    mfu = f"{m['mfu']:.2f}" if m["mfu"] is not None else "n/a"
    eta = f"{m['eta'] / 60:.1f}m" if m["eta"] is not None else "n/a"
    extra = f" | {extra}" if extra else ""
    return (f"step {step:05d}/{num_iterations:05d} ({pct:.2f}%) | loss: {m['loss']:.6f} | lrm: {lrm:.2f} | "
            f"dt: {m['dt'] * 1000:.2f}ms | tok/sec: {int(m['tok_per_sec']):,} | bf16_mfu: {mfu}{extra} | "
            f"total time: {total_time / 60:.2f}m | eta: {eta}")
