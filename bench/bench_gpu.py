"""
Every GPU measurement of the "GPU speed" issue in one run of about 8 minutes on one H100/H200, offline.

    python -m bench.bench_gpu                          # writes bench_gpu.json + bench_gpu.md to $OUT or bench/results/gpu
    python -m bench.bench_gpu --out /tmp/gpu --budget-s 300
    python -m bench.bench_gpu --dry-run                # every part on CPU at toy size, in seconds: the plumbing

Parts, in priority order (a part that no longer fits the time budget is recorded as skipped, one that fails
records its error, and the run goes on either way):
  train_d20      base-training steps of d20 at seq 2048, bf16, for each attention path this machine has
                 (fa3 if FA3 loads, flex = what a GPU without FA3 runs: FlexAttention for the S windows and
                 SDPA for full context, sdpa = SDPA everywhere) x window patterns L and SSSL: compile time,
                 steady-state tok/s, MFU vs nanochat.common.get_peak_flops, peak memory. Every d20 row also
                 trains a short fixed schedule and reports val bpb, so the paths can be checked to agree.
  fp8_d20        the fastest d20 row's path and pattern again with FP8 (as base_train --fp8): tok/s, and val
                 bpb against that bf16 row (same seed, same synthetic token stream, same schedule)
  attention      attention alone, forward + backward on d20-shaped q/k/v, per kernel: fa3, flex (compiled),
                 sdpa, and FlashAttention-4 if `flash_attn.cute` imports (timed only, not wired into the model)
  decode         bench/infer_bench on a random-init d20: decode tok/s at batch 1, 8 and 32
  recipe_12gb    the single-GPU 12 GB recipe: d12, device batch 8 x grad accum 4, window L, bf16, SDPA, with
                 the process limited to 12 GiB (torch.cuda.set_per_process_memory_fraction)
  train_d12      the train_d20 grid at d12

Each training row: the model, optimizer and step of base_train (GPT on the meta device, init_weights,
setup_optimizer with the scaling rules' LR scale, torch.compile(dynamic=False), loop.TrainStep), fed a
fixed synthetic token stream (a random sparse Markov chain, so the loss can fall; no dataset, no tokenizer,
no network). The first step's extra time over a steady step is the compile time. bpb here counts every
token as one byte: only differences between rows mean anything.

FA3 comes from the Hugging Face hub; the bench sets HF_HUB_OFFLINE=1 (unless --online), so FA3 runs only if
it is already in the local hub cache.

Tests: python -m pytest tests/test_bench_gpu.py -q     (the dry run)
"""

import argparse
import contextlib
import importlib.metadata
import itertools
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

from nanochat import flash_attention as fa
from nanochat import fp8, training
from nanochat.common import atomic_write, get_peak_flops, setup_default_logging, strict_json
from nanochat.gpt import GPT
from nanochat.loop import TrainStep
from nanochat.loss_eval import evaluate_bpb

log = logging.getLogger("nanochat.bench_gpu")

PARTS = ("train_d20", "fp8_d20", "attention", "decode", "recipe_12gb", "train_d12")
# Row order within a grid: the likely-fastest rows first, so a tight budget keeps the ones the targets need.
GRID = (("fa3", "SSSL"), ("flex", "SSSL"), ("sdpa", "L"), ("fa3", "L"), ("sdpa", "SSSL"))
# Targets of the issue.
TARGET_MFU = 50.0  # % for d20 bf16 with the best attention path
TARGET_FP8_SPEEDUP = 1.10  # FP8 tok/s over bf16 at d20
TARGET_FP8_BPB = 0.005  # relative val bpb difference, FP8 vs bf16

# Full size on the GPU; toy size for --dry-run on CPU.
FULL = dict(device="cuda", seq_len=2048, vocab=32768, depths={"d12": 12, "d20": 20}, batch={"d12": 32, "d20": 16},
            warmup=3, timed=8, bpb_steps=40, eval_steps=4, compile=True, attn_batch=8, decode_prompt=512,
            decode_tokens=64, recipe_batch=8, recipe_accum=4)
DRY = dict(device="cpu", seq_len=64, vocab=512, depths={"d12": 1, "d20": 2}, batch={"d12": 2, "d20": 2},
           warmup=1, timed=2, bpb_steps=4, eval_steps=1, compile=False, attn_batch=1, decode_prompt=16,
           decode_tokens=4, recipe_batch=2, recipe_accum=2)
# What a row costs when nothing of its kind has run yet (compile included), in seconds on an H100.
FIRST_GUESS_S = {"d12": 45.0, "d20": 75.0}


def build_parser():
    p = argparse.ArgumentParser(description="All GPU speed measurements in one run: training tok/s, MFU, memory, "
                                            "FP8, attention kernels, decode, the 12 GB recipe.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join("bench", "results", "gpu"),
                   help="directory for bench_gpu.json and bench_gpu.md (default: $OUT if set)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts to run, from {','.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget of the whole run; a part or row that no longer fits is skipped")
    p.add_argument("--seed", type=int, default=42, help="seed of the weight init and of the synthetic tokens")
    p.add_argument("--dry-run", action="store_true", help="every part on CPU at toy size (seconds): checks the plumbing")
    p.add_argument("--online", action="store_true", help="let the kernels package reach the Hugging Face hub for FA3")
    return p


# -----------------------------------------------------------------------------
# The machine


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device):
    """GPU name, versions of torch / CUDA / driver / kernels / flash-attn-4, and the attention plan."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "kernels": _version("kernels"), "flash_attn_4": _version("flash-attn-4"), "device": device.type,
           "gpu": None, "capability": None, "total_memory_bytes": None, "driver": None, "peak_flops": None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["total_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
        env["peak_flops"] = get_peak_flops(env["gpu"])
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired) as err:
            env["driver"] = f"unknown ({type(err).__name__})"
    module, reason = fa.load_fa3()
    env["fa3"] = {"available": module is not None, "reason": reason}
    return env


@contextlib.contextmanager
def attention_path(name):
    """Run the model's attention as `name`: "fa3", "sdpa" (everywhere), or "flex", the automatic choice of a
    GPU without FA3 (FlexAttention where a mask is needed, SDPA for full context and decode). FA3 is hidden
    from the automatic choice for "flex" by swapping the loader's state, and restored afterwards."""
    saved = fa._fa3, fa._fa3_reason, fa._override_impl
    try:
        if name == "fa3":
            fa.set_impl("fa3")
        elif name == "sdpa":
            fa.set_impl("sdpa")
        elif name == "flex":
            fa._fa3, fa._fa3_reason = None, "hidden by bench_gpu to measure the path of a GPU without FA3"
            fa.set_impl(None)
        else:
            raise ValueError(f"unknown attention path {name!r}")
        yield
    finally:
        fa._fa3, fa._fa3_reason, fa._override_impl = saved


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -----------------------------------------------------------------------------
# Data: a fixed synthetic token stream


def markov_batches(batch, seq_len, vocab, device, seed, split="train", branching=4, alphabet=8192):
    """Endless (inputs, targets, None) micro-batches from one random sparse Markov chain: each token of an
    `alphabet`-sized subset of the vocabulary has `branching` possible successors, so a model can learn it
    (the loss falls from ln V towards ln 4). The chain depends on `seed` only; "train" and "val" walk it
    with different draws. Same seed and split: the same stream."""
    alphabet = min(alphabet, vocab)
    successors = torch.randint(0, alphabet, (alphabet, branching), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 2 + (split == "val") + 1)
    while True:
        rows = torch.empty(batch, seq_len + 1, dtype=torch.long)
        rows[:, 0] = torch.randint(0, alphabet, (batch,), generator=gen)
        picks = torch.randint(0, branching, (batch, seq_len), generator=gen)
        for t in range(seq_len):  # (B,) per position: cheap next to a training step
            rows[:, t + 1] = successors[rows[:, t], picks[:, t]]
        rows = rows.to(device)
        yield rows[:, :-1], rows[:, 1:], None


# -----------------------------------------------------------------------------
# One training row


def build_model(depth, seq_len, pattern, vocab, device, seed):
    """A GPT as base_train builds it: config from the depth, meta device, to_empty, init_weights (seeded)."""
    config = training.config_for_depth(depth, max_seq_len=seq_len, window_pattern=pattern, vocab_size=vocab)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _scaling_params(model):
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def train_row(cfg, depth, path, pattern, batch, seed, use_fp8=False, steps=None, accum=1, memory_gib=None):
    """Train one configuration for warmup + timed steps (or `steps` in all, for the val bpb), as base_train
    would, and measure it. Returns a result dict."""
    device = torch.device(cfg["device"])
    T, V = cfg["seq_len"], cfg["vocab"]
    total = max(steps or 0, cfg["warmup"] + cfg["timed"])
    row = dict(depth=depth, path=path, pattern=pattern, fp8=use_fp8, device_batch=batch, grad_accum=accum, seq_len=T,
               compile=cfg["compile"], steps=total)
    if cfg["compile"]:
        import torch._dynamo as dynamo  # only here: the import alone costs seconds

        dynamo.reset()  # every row compiles from scratch, so compile times compare
    _reset_memory(device)
    limited = memory_gib is not None and device.type == "cuda"
    if limited:
        fraction = memory_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, fraction), device)
        row["memory_fraction"] = round(fraction, 4)
    try:
        with attention_path(path):
            row["attention_plan"] = fa.attention_plan(device.type, torch.bfloat16 if device.type == "cuda" else torch.float32)[0]
            model = build_model(depth, T, pattern, V, device, seed)
            if use_fp8:
                converted, kept = fp8.convert_to_float8_training(model)
                row["fp8_layers"] = {"converted": converted, "kept": kept}
            flops_per_token = model.estimate_flops()
            with torch.device("meta"):  # the d12 reference of the scaling rules, shapes only
                ref = GPT(training.config_for_depth(12, max_seq_len=T, window_pattern=pattern, vocab_size=V))
            plan = training.scaling_plan(_scaling_params(model), _scaling_params(ref), flops_per_token,
                                         total_batch_size=batch * T * accum, num_iterations=total)
            s = plan.batch_lr_scale
            # base_train's default LRs at this batch's LR scale.
            optimizer = model.setup_optimizer(unembedding_lr=0.008 * s, embedding_lr=0.3 * s, matrix_lr=0.02 * s,
                                              scalar_lr=0.5 * s, weight_decay=plan.weight_decay)
            fwd = torch.compile(model, dynamic=False) if cfg["compile"] else model
            step = TrainStep(fwd, optimizer, accum)
            batches = markov_batches(batch, T, V, device, seed)
            times, losses = [], []
            warmup = max(1, total // 10)
            for it in range(total):
                micro_batches = ((x, y) for x, y, _ in itertools.islice(batches, accum))  # as TrainLoop hands them over
                _sync(device)
                t0 = time.perf_counter()
                result = step(micro_batches, lrm=training.lr_multiplier(it, total, warmup_steps=warmup),
                              momentum=training.muon_momentum(it, total),
                              weight_decay=training.muon_weight_decay(it, total, plan.weight_decay))
                _sync(device)
                times.append(time.perf_counter() - t0)
                losses.append(result.loss)
            timed = times[cfg["warmup"]:cfg["warmup"] + cfg["timed"]]
            step_s = statistics.median(timed)
            tok_per_s = batch * T * accum / step_s
            peak = get_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
            row.update(first_step_s=times[0], compile_s=max(0.0, times[0] - step_s), step_ms=1e3 * step_s,
                       tok_per_s=tok_per_s, flops_per_token=flops_per_token,
                       mfu_percent=100 * flops_per_token * tok_per_s / peak if peak else None,
                       peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                       first_loss=losses[0], last_loss=losses[-1])
            if steps:
                row["val_bpb"] = val_bpb(model, cfg, batch, seed, use_fp8)
    finally:
        if limited:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        _reset_memory(device)
    return row


@torch.no_grad()
def val_bpb(model, cfg, batch, seed, use_fp8):
    """bpb of the uncompiled model on held-out rows of the same chain (every token one byte), in the compute
    dtype as base_train evaluates (FP8 layers swapped back)."""
    device = model.get_device()
    token_bytes = torch.ones(cfg["vocab"], dtype=torch.int64, device=device)
    val = markov_batches(batch, cfg["seq_len"], cfg["vocab"], device, seed, split="val")
    model.eval()
    with fp8.disable_fp8(model) if use_fp8 else contextlib.nullcontext():
        bpb = evaluate_bpb(model, val, cfg["eval_steps"], token_bytes)
    model.train()
    return bpb


# -----------------------------------------------------------------------------
# The parts


class Budget:
    """Wall-clock budget of the run; rows ask whether their estimated cost still fits."""

    def __init__(self, seconds):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self):
        return self.seconds - (time.perf_counter() - self.t0)

    def fits(self, estimate):
        return self.left() >= estimate


def _run_row(rows, budget, estimate, fn, **row_id):
    """Append fn()'s row, or the reason there is none (budget, error); returns the row."""
    if not budget.fits(estimate):
        row = dict(row_id, status="skipped", reason=f"time budget ({budget.left():.0f}s left, ~{estimate:.0f}s needed)")
    else:
        t0 = time.perf_counter()
        try:
            row = dict(fn(), status="ok")
        except Exception as err:  # a failing row is a result: record it and measure the rest
            row = dict(row_id, status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=8))
        row["wall_s"] = time.perf_counter() - t0
    log.info("%s", {k: v for k, v in row.items() if k != "traceback"})
    rows.append(row)
    return row


def paths_available(env, device):
    """{path: None if it runs here, else why not}."""
    fa3 = None if env["fa3"]["available"] else f"FA3 unavailable: {env['fa3']['reason']}"
    flex = None if device.type == "cuda" else "on CPU the automatic choice is SDPA (FlexAttention runs compiled on CUDA only)"
    return {"fa3": fa3, "flex": flex, "sdpa": None}


def part_train(cfg, env, budget, seed, size):
    """The grid of attention paths x window patterns at one depth (bf16). d20 rows train the bpb schedule."""
    depth, batch = cfg["depths"][size], cfg["batch"][size]
    available = paths_available(env, torch.device(cfg["device"]))
    rows, estimate = [], FIRST_GUESS_S[size] if cfg["device"] == "cuda" else 5.0
    steps = cfg["bpb_steps"] if size == "d20" else None
    for path, pattern in GRID:
        why_not = available[path]
        if why_not and not (path == "flex" and cfg["device"] == "cpu"):  # the dry run still walks the flex row
            rows.append(dict(depth=depth, path=path, pattern=pattern, status="skipped", reason=why_not))
            continue
        row = _run_row(rows, budget, estimate, lambda: train_row(cfg, depth, path, pattern, batch, seed, steps=steps),
                       depth=depth, path=path, pattern=pattern)
        if why_not:
            row["note"] = why_not
        if row["status"] == "ok":
            estimate = max(estimate, row["wall_s"])
    return {"rows": rows}


def best_row(rows):
    ok = [r for r in rows if r.get("status") == "ok" and not r.get("fp8")]
    return max(ok, key=lambda r: r["tok_per_s"]) if ok else None


def part_fp8(cfg, env, budget, seed, results):
    """d20 with FP8 on the fastest bf16 d20 row's path and pattern; val bpb against that row."""
    base = best_row(results.get("train_d20", {}).get("rows", []))
    if base is None:
        return {"status": "skipped", "reason": "no successful bf16 d20 row to compare with"}
    device = torch.device(cfg["device"])
    try:
        fp8.check_fp8_support(device)
    except RuntimeError as err:
        return {"status": "skipped", "reason": str(err), "baseline": _brief(base)}
    rows = []
    row = _run_row(rows, budget, FIRST_GUESS_S["d20"], lambda: train_row(
        cfg, base["depth"], base["path"], base["pattern"], base["device_batch"], seed, use_fp8=True, steps=cfg["bpb_steps"]),
        depth=base["depth"], path=base["path"], pattern=base["pattern"], fp8=True)
    out = {"rows": rows, "baseline": _brief(base)}
    if row["status"] == "ok":
        out["speedup"] = row["tok_per_s"] / base["tok_per_s"]
        out["val_bpb_rel_diff"] = (row["val_bpb"] - base["val_bpb"]) / base["val_bpb"]
    return out


def _brief(row):
    return {k: row.get(k) for k in ("depth", "path", "pattern", "tok_per_s", "mfu_percent", "val_bpb")}


def _load_fa4():
    """FlashAttention-4's flash_attn_func if the flash-attn-4 package imports here, else (None, why)."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as err:  # not installed, or installed without a usable CUDA toolchain
        return None, f"{type(err).__name__}: {err}"
    return flash_attn_func, None


def part_attention(cfg, env, budget, seed):
    """Attention alone on d20 shapes (B, T, 10 heads, 128): forward + backward per kernel and window."""
    device = torch.device(cfg["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = training.config_for_depth(cfg["depths"]["d20"], max_seq_len=cfg["seq_len"], vocab_size=cfg["vocab"])
    B, T, H, D = cfg["attn_batch"], cfg["seq_len"], config.n_head, config.n_embd // config.n_head
    short = -(-T // 4 // 128) * 128
    fa4, fa4_why = _load_fa4()
    available = paths_available(env, device)
    kernels = {"fa3": available["fa3"], "flex": available["flex"], "sdpa": None,
               "fa4": None if fa4 is not None and device.type == "cuda" else (fa4_why or "needs CUDA")}
    gen = torch.Generator(device=device).manual_seed(seed)
    base = [torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    rows = []
    for name, why_not in kernels.items():
        for window in (T, short):
            if why_not:
                rows.append(dict(kernel=name, window=window, status="skipped", reason=why_not))
                continue

            def run(name=name, window=window):
                if name == "fa4":
                    def call(q, k, v):
                        out = fa4(q, k, v, causal=True, window_size=(window, 0))
                        return out[0] if isinstance(out, tuple) else out  # some versions also return the LSE
                else:
                    def call(q, k, v):
                        with _forced(name):  # flex forced: the full window runs FlexAttention too
                            return fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
                return time_attention(call, base, device, reps=2 if device.type == "cpu" else 10)

            _run_row(rows, budget, 15.0 if device.type == "cuda" else 1.0, run, kernel=name, window=window)
            rows[-1].update(kernel=name, window=window)
    return {"shape": {"B": B, "T": T, "H": H, "D": D, "dtype": str(dtype).removeprefix("torch.")}, "rows": rows}


@contextlib.contextmanager
def _forced(impl):
    saved = fa._override_impl
    fa.set_impl(impl)
    try:
        yield
    finally:
        fa._override_impl = saved


def time_attention(call, base, device, reps):
    """Median ms of forward + backward of call(q, k, v) after two warm-up calls (compile included there)."""
    q, k, v = (t.clone().requires_grad_() for t in base)
    times = []
    for i in range(2 + reps):
        _sync(device)
        t0 = time.perf_counter()
        out = call(q, k, v)
        out.float().square().mean().backward()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    return {"ms": 1e3 * statistics.median(times)}


def part_decode(cfg, env, budget, seed):
    """bench/infer_bench on a random-init d20 (its own measurement code): decode tok/s at batch 1, 8, 32."""
    from bench import infer_bench

    depth = cfg["depths"]["d20"]
    argv = ["--random-init", "--depth", str(depth), "--vocab-size", str(cfg["vocab"]), "--max-seq-len", str(cfg["seq_len"]),
            "--device-type", cfg["device"], "--prompt-tokens", str(cfg["decode_prompt"]),
            "--decode-tokens", str(cfg["decode_tokens"]), "--batch-sizes", "1,8,32" if cfg["device"] == "cuda" else "1,2",
            "--repeats", "1", "--warmup-tokens", "4" if cfg["device"] == "cuda" else "0", "--seed", str(seed)]
    result = infer_bench.main(argv)
    return {"argv": argv, "attention": fa.attention_plan(cfg["device"], torch.bfloat16)[0],
            "prefill_tok_per_s": result["prefill"]["tok_per_sec"],
            "sweep": [{k: r[k] for k in ("batch_size", "tok_per_sec", "tpot_sec", "mbu_percent", "peak_vram_bytes")}
                      for r in result["sweep"]]}


def part_recipe_12gb(cfg, env, budget, seed):
    """The 12 GB single-GPU recipe (d12, device batch 8 x accum 4, L, bf16, SDPA) under a 12 GiB memory cap."""
    rows = []
    _run_row(rows, budget, FIRST_GUESS_S["d12"] if cfg["device"] == "cuda" else 5.0,
             lambda: train_row(cfg, cfg["depths"]["d12"], "sdpa", "L", cfg["recipe_batch"], seed, accum=cfg["recipe_accum"],
                               memory_gib=12),
             depth=cfg["depths"]["d12"], path="sdpa", pattern="L")
    return {"rows": rows, "memory_cap_gib": 12, "note": None if cfg["device"] == "cuda" else "no memory cap on CPU"}


# -----------------------------------------------------------------------------
# Targets and the report


def targets(results):
    """The issue's three targets: {name: {value, limit, passed (None = not measured)}}."""
    d20 = results.get("train_d20", {}).get("rows", [])
    best = best_row(d20)
    mfu = best.get("mfu_percent") if best else None
    out = {"d20_bf16_mfu_percent": {"value": mfu, "limit": f">= {TARGET_MFU}", "row": _brief(best) if best else None,
                                    "passed": None if mfu is None else mfu >= TARGET_MFU}}
    f = results.get("fp8_d20", {})
    speedup, diff = f.get("speedup"), f.get("val_bpb_rel_diff")
    out["fp8_speedup"] = {"value": speedup, "limit": f">= {TARGET_FP8_SPEEDUP}",
                          "passed": None if speedup is None else speedup >= TARGET_FP8_SPEEDUP}
    out["fp8_val_bpb_rel_diff"] = {"value": diff, "limit": f"<= {TARGET_FP8_BPB}",
                                   "passed": None if diff is None else abs(diff) <= TARGET_FP8_BPB}
    ok = {(r["path"], r["pattern"]): r for r in d20 if r.get("status") == "ok"}
    flex, plain = ok.get(("flex", "SSSL")), ok.get(("sdpa", "L"))
    ratio = flex["tok_per_s"] / plain["tok_per_s"] if flex and plain and "note" not in flex else None
    out["sssl_without_fa3_over_l"] = {"value": ratio, "limit": ">= 1.0", "passed": None if ratio is None else ratio >= 1.0}
    return out


def _f(value, spec):
    return "n/a" if value is None else format(value, spec)


def markdown(report):
    env = report["environment"]
    lines = [f"# bench_gpu{' (dry run, CPU, toy sizes)' if report['dry_run'] else ''}", "",
             f"GPU: {env['gpu'] or env['device']} (SM {env['capability'] or '-'}), peak bf16 {_f(env['peak_flops'] and env['peak_flops'] / 1e12, '.1f')} TFLOP/s; "
             f"torch {env['torch']}, CUDA {env['cuda']}, driver {env['driver']}, kernels {env['kernels']}, flash-attn-4 {env['flash_attn_4']}; "
             f"FA3: {'loaded' if env['fa3']['available'] else 'unavailable'} ({env['fa3']['reason']}). Total {report['wall_s']:.0f}s.", "",
             "| part | depth | path | pattern | fp8 | B x accum | tok/s | MFU % | peak GiB | compile s | step ms | val bpb | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for part in ("train_d20", "fp8_d20", "recipe_12gb", "train_d12"):
        for r in report["results"].get(part, {}).get("rows", []):
            mem = r.get("peak_memory_bytes")
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason') or r.get('error')}"
            lines.append(f"| {part} | {r.get('depth')} | {r.get('path')} | {r.get('pattern')} | {'yes' if r.get('fp8') else 'no'} | "
                         f"{r.get('device_batch', '-')} x {r.get('grad_accum', '-')} | {_f(r.get('tok_per_s'), ',.0f')} | "
                         f"{_f(r.get('mfu_percent'), '.1f')} | {_f(mem and mem / 2**30, '.2f')} | {_f(r.get('compile_s'), '.1f')} | "
                         f"{_f(r.get('step_ms'), '.1f')} | {_f(r.get('val_bpb'), '.4f')} | {status} |")
    att = report["results"].get("attention", {})
    if att.get("rows"):
        lines += ["", f"Attention alone, forward + backward, {att['shape']}:", "", "| kernel | window | ms | status |", "|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['window']} | {_f(r.get('ms'), '.2f')} | {r['status'] if r['status'] == 'ok' else r.get('reason') or r.get('error')} |"
                  for r in att["rows"]]
    dec = report["results"].get("decode", {})
    if dec.get("sweep"):
        lines += ["", f"Decode (bench/infer_bench, attention {dec['attention']}), prefill {dec['prefill_tok_per_s']:,.0f} tok/s:", "",
                  "| batch | tok/s | TPOT ms | MBU % |", "|---|---|---|---|"]
        lines += [f"| {r['batch_size']} | {r['tok_per_sec']:,.1f} | {1e3 * r['tpot_sec']:.2f} | {_f(r['mbu_percent'], '.1f')} |" for r in dec["sweep"]]
    lines += ["", "Targets:", ""]
    for name, t in report["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
        lines.append(f"- [{verdict}] {name}: {_f(t['value'], '.4g')} (target {t['limit']})")
    failed = [f"{name}: {part.get('error') or part.get('reason')}" for name, part in report["results"].items()
              if part.get("status") in ("error", "skipped")]
    if failed:
        lines += ["", "Parts not measured:", ""] + [f"- {line}" for line in failed]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Main


def run_part(name, fn):
    """fn() as a part's result: its dict with status ok, or the error (the run goes on)."""
    t0 = time.perf_counter()
    try:
        out = fn()
        out.setdefault("status", "ok")
    except Exception as err:  # a failing part is a result: record it and run the others
        out = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
    out["wall_s"] = time.perf_counter() - t0
    log.info("part %s: %s in %.1fs", name, out["status"], out["wall_s"])
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown --parts {','.join(unknown)}; choose from {','.join(PARTS)}")
    if not args.online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network on the bench machine: no hub timeouts
    cfg = DRY if args.dry_run else FULL
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU (or pass --dry-run to check the plumbing on CPU)")
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    if cfg["device"] == "cuda":
        torch.set_float32_matmul_precision("high")
    device = torch.device(cfg["device"])
    t0 = time.perf_counter()
    budget = Budget(args.budget_s)
    env = environment(device)
    log.info("environment: %s", env)
    results = {}
    steps = {
        "train_d20": lambda: part_train(cfg, env, budget, args.seed, "d20"),
        "fp8_d20": lambda: part_fp8(cfg, env, budget, args.seed, results),
        "attention": lambda: part_attention(cfg, env, budget, args.seed),
        "decode": lambda: part_decode(cfg, env, budget, args.seed),
        "recipe_12gb": lambda: part_recipe_12gb(cfg, env, budget, args.seed),
        "train_d12": lambda: part_train(cfg, env, budget, args.seed, "d12"),
    }
    for name in PARTS:
        if name in parts:
            results[name] = run_part(name, steps[name])
    report = {"dry_run": args.dry_run, "argv": sys.argv[1:] if argv is None else list(argv), "config": cfg,
              "environment": env, "results": results, "targets": targets(results), "wall_s": time.perf_counter() - t0}
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "bench_gpu.json"), strict_json(report, indent=1))
    text = markdown(report)
    atomic_write(os.path.join(args.out, "bench_gpu.md"), text)
    print(text)
    return report


if __name__ == "__main__":
    main()
