"""What every training stage shares: the scaling rules behind `--depth`, the schedules, the device batch-size probe,
CPU threads, the LR and batch flags and the step line's bookkeeping. The step itself is in nanochat/loop.py."""

import argparse
import ctypes
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.common import ConfigError, UserError, dist_world_size, usable_cores

# Reference batch for the LR / WD scaling rules: 2^19 tokens, the batch the base LRs were tuned at.
B_REF = 2**19


# -----------------------------------------------------------------------------
# CPU runtime settings


def configure_cpu_threads(num_threads=None):
    """Thread and float settings for training on CPU (None = usable_cores() threads); returns the thread count."""
    if num_threads is None:
        num_threads = usable_cores()
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    torch.set_num_threads(num_threads)  # more threads than cores only adds context switches to every matmul
    # Tiny gradients (rarely seen embedding rows in the AdamW moments) take x86's slow denormal path otherwise.
    torch.set_flush_denormal(True)
    keep_freed_heap_memory()
    return num_threads


def keep_freed_heap_memory():
    """glibc only: serve large allocations from the heap and keep freed memory for reuse; False elsewhere."""
    # Otherwise a tensor over the mmap threshold (32 MB at most) is a fresh mmap: the fp32 (N, V) logits page-fault
    # and get zeroed by the kernel every step, ~25% of a d4 fp32 CPU step. Allocation changes no number.
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>; mallopt returns 1 on success
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


# -----------------------------------------------------------------------------
# Scaling rules


def config_for_depth(depth, aspect_ratio=64, head_dim=128, max_seq_len=2048, window_pattern="SSSL", vocab_size=32768):
    """GPTConfig from the depth dial: width = depth * aspect_ratio rounded UP to a multiple of head_dim (so the head
    dim is exactly `head_dim`, FA3 wants a multiple of 8, even for odd depths)."""
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


def scaling_plan(scaling_params, ref_scaling_params, flops_per_token, total_batch_size=-1,
                 num_iterations=-1, target_flops=-1.0, target_param_data_ratio=12.0, weight_decay=0.28):
    """Batch size, LR scale, weight decay and horizon from the model's scaling params (transformer matrices +
    lm_head) and d12's with the same flags. Batch and WD depend only on their ratio, so --target-flops works too."""
    if num_iterations <= 0 and target_flops <= 0 and target_param_data_ratio <= 0:
        raise ValueError("no training horizon: set one of --num-iterations, --target-flops or --target-param-data-ratio to a positive value")
    target_tokens = int(target_param_data_ratio * scaling_params)
    ref_tokens = target_param_data_ratio * ref_scaling_params
    if total_batch_size == -1:  # the power of two nearest B_opt ∝ D^0.383 (Power Lines, arXiv 2505.13738)
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / ref_tokens) ** 0.383))
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
        below = total_batch_size // world_tokens * world_tokens
        nearest = " or ".join(f"--total-batch-size={v}" for v in (below, below + world_tokens) if v > 0)
        rows = [b for b in range(device_batch_size, 0, -1) if total_batch_size % (b * seq_len * world_size) == 0]
        also = f", or keep it with --device-batch-size={rows[0]}" if rows else ""
        raise ConfigError(f"--total-batch-size {total_batch_size:,} is not divisible by device batch x seq len x world size = "
                          f"{device_batch_size} x {seq_len} x {world_size} = {world_tokens:,}; use {nearest}{also}")
    return total_batch_size // world_tokens


def eval_steps_for(eval_tokens, device_batch_size, seq_len, world_size, flag="--eval-tokens"):
    """Batches per evaluation for `eval_tokens` over all ranks, rounded down; below one batch is an error naming `flag`."""
    per_step = device_batch_size * seq_len * world_size
    if eval_tokens < per_step:
        raise ConfigError(f"{flag} {eval_tokens:,} is less than one batch of {device_batch_size} x {seq_len} x {world_size} "
                          f"rank(s) = {per_step:,} tokens; raise {flag} or lower --device-batch-size")
    return eval_tokens // per_step


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


def progress_lr_multiplier(progress, warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0):
    """LR multiplier from progress in [0, 1] (mid and SFT, whose horizon may be one epoch of data): linear warmup
    over `warmup_ratio`, flat, then linear to `final_lr_frac` over the last `warmdown_ratio`."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1 - warmdown_ratio:
        return 1.0
    d = (progress - (1 - warmdown_ratio)) / warmdown_ratio
    return (1 - d) + d * final_lr_frac


def momentum_warmup(it, steps=300, start=0.85, end=0.95):
    """Muon momentum for finetuning stages: `start` -> `end` linearly over the first `steps` steps, then held."""
    frac = min(it / steps, 1.0)
    return (1 - frac) * start + frac * end


def linear_decay(it, num_iterations):
    """1 at step 0 down to 1/num_iterations at the last trained step (RL)."""
    return 1.0 - it / num_iterations


# -----------------------------------------------------------------------------
# Device batch size: probe once at startup


def batch_size_candidates(total_batch_size, seq_len, world_size, largest=64):
    """Device batch sizes that split `total_batch_size` evenly (powers of two up to `largest`), largest first."""
    per_rank_rows = total_batch_size // (seq_len * world_size) if total_batch_size % (seq_len * world_size) == 0 else 0
    sizes = [b for b in (2**i for i in range(int(math.log2(largest)) + 1)) if per_rank_rows and per_rank_rows % b == 0]
    return sorted(sizes, reverse=True)


class OutOfMemory(UserError):
    """The device ran out of memory during a training step (the message names the flag to lower)."""


def _all_reduce(tensor, op):
    if dist_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def _everywhere(flag, device):
    """True when `flag` holds on every rank (a MIN all-reduce; the flag itself in a single process)."""
    if dist_world_size() == 1:
        return flag
    return _all_reduce(torch.tensor(int(flag), device=device), dist.ReduceOp.MIN).item() == 1


def probe_device_batch_size(try_batch, candidates, device, margin=0.9, log=print):
    """The largest of `candidates` for which `try_batch(B)` raises no OOM and, on CUDA, peaks within `margin` of what
    this process can have (room for fragmentation and the optimizer's temporaries)."""
    if not candidates:
        raise ConfigError("no device batch size divides the total batch evenly; set --device-batch-size and --total-batch-size explicitly")
    budget = None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the cache holds is free for the probe too
        free, total = torch.cuda.mem_get_info(device)
        budget = torch.cuda.memory_reserved(device) + free  # what this process holds plus what is free on the card
        fraction = torch.cuda.get_per_process_memory_fraction(device)
        if fraction < 1.0:  # a per-process cap (to emulate a 12 GB card on a bigger one)
            budget = min(budget, int(fraction * total))
    for b in candidates:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            try_batch(b)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            fits = peak is None or peak <= margin * budget
            detail = f"peak {peak / 2**30:.1f} GiB of {budget / 2**30:.1f} GiB available" if peak is not None else "no memory limit checked off CUDA"
        except torch.OutOfMemoryError:
            fits, detail = False, "out of memory"
        fits_everywhere = _everywhere(fits, device)  # all ranks try the same sizes and pick the same one
        log(f"device batch size probe: {b} rows -> {'fits' if fits_everywhere else 'does not fit'} ({detail}, {time.perf_counter() - t0:.1f}s)")
        if fits_everywhere:
            return b
    raise OutOfMemory(f"even {candidates[-1]} row(s) per micro-batch do not fit in memory; use a smaller model (--depth) "
                      "or a shorter --max-seq-len")


def probe_training_step(model, optimizer, seq_len, vocab_size, device):
    """A `try_batch` for probe_device_batch_size: forward + backward of random tokens, leaving no gradients behind;
    its `reset()` drops the optimizer state the probe allocated."""
    # An optimizer without state gets it from one zero-LR step on zero gradients (the weights stay exactly as they
    # are), so its memory is counted. One with state (SFT's warm start) keeps it: a zero step would decay its moments.
    owns_state = not optimizer.state

    def allocate_state():
        saved = [g["lr"] for g in optimizer.param_groups]
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        optimizer.step()
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr
        model.zero_grad(set_to_none=True)

    def try_batch(b):
        try:
            # The loaders' layout (two views of one buffer), so a compiled model traces the graph training reuses.
            inputs, targets = batch_views(torch.randint(0, vocab_size, (2 * b * seq_len,), device=device), b, seq_len)
            model(inputs, targets).backward()
        finally:
            model.zero_grad(set_to_none=True)

    def reset():
        if owns_state:
            optimizer.state.clear()  # fresh moments: the probe's zero step must not count as a real one
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    if owns_state:
        allocate_state()
    try_batch.reset = reset
    return try_batch


def batch_views(buffer, B, T):
    """(inputs, targets), each (B, T), as two views of one (2*B*T,) buffer: one host-to-device copy per batch."""
    return buffer[:B * T].view(B, T), buffer[B * T:].view(B, T)


def window_pattern_arg(value):
    """argparse type of --window-pattern: a non-empty string of S (short window) and L (full context)."""
    if not value or set(value.upper()) - {"S", "L"}:
        raise argparse.ArgumentTypeError(f"must be a string of S and L such as SSSL or L, got {value!r}")
    return value.upper()


def device_batch_size_arg(value):
    """argparse type of --device-batch-size: a positive int, or "auto" (probe on CUDA)."""
    if value == "auto":
        return value
    rows = int(value) if value.strip().isdigit() else 0
    if rows < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {value!r}")
    return rows


CPU_DEVICE_BATCH_SIZE = 32  # what --device-batch-size auto means where no memory probe runs


def add_device_batch_size_flag(group, default):
    """--device-batch-size of base, mid and SFT; `default` None = inherit from the source."""
    group.add_argument("--device-batch-size", type=device_batch_size_arg, default=default,
                       help=f"rows per micro-batch per rank; auto = the largest that fits (probed on CUDA), {CPU_DEVICE_BATCH_SIZE} elsewhere")


# Default LRs per stage: (embedding, unembedding, matrix). They differ on purpose. Pretraining starts from random
# weights with the AdamW LRs tuned for that (0.3 / 0.008). Midtraining and RL continue a trained model with the
# smaller AdamW LRs they were tuned with (0.2 / 0.004). SFT has none of its own: None inherits the LRs its source
# checkpoint trained with (finetune.INHERITED holds the fallback for a checkpoint that records none).
STAGE_LRS = {"base": (0.3, 0.008, 0.02), "mid": (0.2, 0.004, 0.02), "sft": (None, None, None), "rl": (0.2, 0.004, 0.02)}


def add_lr_flags(group, stage):
    """--embedding-lr, --unembedding-lr and --matrix-lr with `stage`'s defaults from STAGE_LRS."""
    embedding, unembedding, matrix = STAGE_LRS[stage]
    group.add_argument("--embedding-lr", type=float, default=embedding, help="AdamW LR of the token embedding (value embeddings get half)")
    group.add_argument("--unembedding-lr", type=float, default=unembedding, help="AdamW LR of lm_head")
    group.add_argument("--matrix-lr", type=float, default=matrix, help="Muon LR of the transformer matrices")


def resolve_device_batch_size(value, fallback, model, optimizer, total_batch_size, seq_len, world_size, vocab_size,
                              device, log=print):
    """--device-batch-size as an int: for "auto" the largest size whose training step fits on this CUDA device,
    or `fallback` off CUDA, where nothing can be probed."""
    if value != "auto":
        return value
    if device.type != "cuda":
        log(f"--device-batch-size auto: no memory probe on {device.type}; using {fallback}")
        return fallback
    candidates = batch_size_candidates(total_batch_size, seq_len, world_size)
    try_batch = probe_training_step(model, optimizer, seq_len, vocab_size, device)
    try:
        rows = probe_device_batch_size(try_batch, candidates, device, log=log)
    finally:
        try_batch.reset()
    log(f"--device-batch-size auto: {rows} rows fit one training step at {seq_len} tokens (90% memory margin)")
    return rows


# -----------------------------------------------------------------------------
# Bookkeeping for the step log line


def mfu_label(device_type, dtype):
    """The step line's name for MFU: "bf16_mfu" (the card's peak) on CUDA, else e.g. "cpu_fp32_mfu" (measured rate)."""
    if device_type == "cuda":
        return "bf16_mfu"
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))
    return f"{device_type}_{short}_mfu"


@dataclass
class StepMeter:
    """EMA of the loss (debiased), tok/s, MFU and ETA; steps up to `warmup` (torch.compile) are not timed."""

    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None  # aggregate over all ranks; None = unknown (MFU shown as n/a)
    mfu_label: str = "mfu"  # what the MFU is measured against (mfu_label()), named in the step line
    smooth_loss: float = 0.0
    total_time: float = 0.0
    timed_steps: int = 0
    timed_tokens: int = 0
    warmup: int = 10
    _t0: float = 0.0

    def start(self, sync=None):
        if sync:
            sync()
        self._t0 = time.perf_counter()

    def stop(self, step, loss, progress, sync=None, tokens=None):
        """Record step `step` (at `progress` in [0, 1]); `tokens` defaults to tokens_per_step. Returns its metrics."""
        if sync:
            sync()
        dt = time.perf_counter() - self._t0
        tokens = self.tokens_per_step if tokens is None else tokens
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss
        debiased = self.smooth_loss / (1 - 0.9 ** (step + 1))
        if step > self.warmup:
            self.total_time += dt
            self.timed_steps += 1
            self.timed_tokens += tokens
        flops_per_sec = self.flops_per_token * tokens / dt
        mfu = 100 * flops_per_sec / self.peak_flops if self.peak_flops else None
        eta = None
        if self.timed_steps and 0 < progress:
            remaining_steps = (step + 1) * (1 - progress) / progress
            eta = remaining_steps * self.total_time / self.timed_steps
        return dict(loss=debiased, dt=dt, tok_per_sec=tokens / dt, flops_per_sec=flops_per_sec, mfu=mfu, eta=eta)

    def avg_tok_per_sec(self):
        return self.timed_tokens / self.total_time if self.total_time > 0 else None

    def state_dict(self):
        return dict(smooth_loss=self.smooth_loss, total_time=self.total_time, timed_steps=self.timed_steps,
                    timed_tokens=self.timed_tokens)

    def load_state_dict(self, state):
        self.smooth_loss = state["smooth_loss"]
        self.total_time = state["total_time"]
        self.timed_steps = state["timed_steps"]
        self.timed_tokens = state.get("timed_tokens", self.timed_steps * self.tokens_per_step)

    def format_line(self, step, num_iterations, progress, m, lrm, extra=""):
        total = f"/{num_iterations:05d}" if num_iterations else ""
        mfu = f"{m['mfu']:.2f}" if m["mfu"] is not None else "n/a"
        eta = f"{m['eta'] / 60:.1f}m" if m["eta"] is not None else "n/a"
        extra = f" | {extra}" if extra else ""
        return (f"step {step:05d}{total} ({100 * progress:.2f}%) | loss: {m['loss']:.6f} | lrm: {lrm:.2f} | "
                f"dt: {m['dt'] * 1000:.2f}ms | tok/sec: {int(m['tok_per_sec']):,} | {self.mfu_label}: {mfu}{extra} | "
                f"total time: {self.total_time / 60:.2f}m | eta: {eta}")
