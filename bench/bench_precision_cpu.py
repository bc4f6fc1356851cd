"""
CPU training precision: does a precision setting keep the fp32 loss curve, and what does it cost in wall time?

Runs the real `scripts.base_train` once per (variant, seed) in a fresh process, on the data and tokenizer
in $NANOCHAT_BASE_DIR (build them as runcpu.sh does: `python -m nanochat.dataset -n 4 --offline-fallback`
then `python -m scripts.tok_train --max-chars=20000000 --vocab-size=8192`), with one fixed config (depth 4,
T 512, batch 4096 tokens, 300 steps, val bpb every 100 steps on 65,536 tokens). It prints every run's val
bpb curve, the mean and spread over seeds per variant, tok/s, the largest train-loss rise in the first 50
steps (a spike), and the training time each variant needs to reach the fp32 run's final val bpb.

    python -m bench.bench_precision_cpu                                   # default vs fp32, seeds 42 and 43
    python -m bench.bench_precision_cpu --variants fp32,bf16,bf16-attn16 --seeds 42
    python -m bench.bench_precision_cpu --list                            # the variants

Variants: `default` (whatever nanochat picks on this machine), `fp32`, `bf16` (the bf16 policy as it
ships), and ablations of the bf16 policy, each changing one thing through a patch in the child process
(see VARIANTS). On a CPU without native bf16 matmuls a bf16 run would take ~200x longer, so bf16
variants run under `bench.bf16_emulation` there (bf16 numerics, fp32 speed): their curves are real,
their tok/s are not, and the report says so.

Timings mean something only on a quiet machine with runs in sequence (the default); `--jobs 2` runs two
at a time with one thread each, for curves only.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

# The config of the precision issue: runcpu.sh's base_train flags.
TRAIN_FLAGS = ["--depth=4", "--head-dim=64", "--window-pattern=L", "--max-seq-len=512", "--device-batch-size=8",
               "--total-batch-size=4096", "--num-iterations=300", "--eval-every=100", "--eval-tokens=65536",
               "--warmup-steps=10", "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu"]

# name -> (NANOCHAT_DTYPE or None, patches applied in the child, description). Every bf16 variant changes
# one thing against the bf16 policy as it ships (attention math in fp32 on CPU, embedding tables and their
# AdamW moments in bf16, Muon orthogonalisation in bf16, the chunked loss, the fused CPU AdamW).
VARIANTS = {
    "default": (None, (), "nanochat's own choice on this machine"),
    "fp32": ("float32", (), "fp32 everywhere (the reference)"),
    "bf16": ("bfloat16", (), "bf16 compute with the shipped bf16 policy"),
    "bf16-attn16": ("bfloat16", ("attn16",), "bf16, and the fused CPU attention kernel in bf16 (upstream's behaviour)"),
    "bf16-emb32": ("bfloat16", ("emb32",), "bf16, embedding tables (and their AdamW moments) stored in fp32"),
    "bf16-attn16-emb32": ("bfloat16", ("attn16", "emb32"), "bf16 attention kernel, fp32 embedding tables"),
    "bf16-ortho32": ("bfloat16", ("ortho32",), "bf16, Muon orthogonalisation in fp32"),
    "bf16-refloss": ("bfloat16", ("refloss",), "bf16, the plain (unchunked) loss path"),
    "bf16-refadamw": ("bfloat16", ("refadamw",), "bf16, the eager AdamW kernel instead of the fused CPU one"),
}

_VAL = re.compile(r"Step (\d+) \| Validation bpb: ([0-9.]+)")
_STEP = re.compile(r"step (\d+)/\d+ .*?\| loss: ([0-9.]+) .*?\| dt: ([0-9.]+)ms")
_TIME = re.compile(r"Total training time: ")


def build_parser():
    p = argparse.ArgumentParser(description="bf16 vs fp32 CPU training: val-bpb curves over seeds and time to the fp32 result.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default="default,fp32", help="comma-separated variant names (--list shows them)")
    p.add_argument("--seeds", default="42,43", help="comma-separated init seeds")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (val bpb every steps/3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = all cores, or 1 with --jobs > 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (timings are only valid with 1)")
    p.add_argument("--emulate", default="auto", choices=["auto", "on", "off"],
                   help="emulate bf16 matmuls in fp32 (auto: when this CPU has no native bf16)")
    p.add_argument("--out-dir", default="bench/results/precision", help="per-run logs and the JSON summary go here")
    p.add_argument("--reuse", action="store_true", help="parse a finished run's log in --out-dir instead of running it again")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    return p


# -----------------------------------------------------------------------------
# Child: one base_train run with a variant's patches


def _apply_patches(patches, emulate):
    import functools

    import torch

    from nanochat import gpt, optim

    if "emb32" in patches:
        init = gpt.GPT.__init__
        gpt.GPT.__init__ = functools.partialmethod(lambda self, *a, **k: init(self, *a, **{**k, "embedding_dtype": torch.float32}))
    if "ortho32" in patches:
        init = optim.MuonAdamW.__init__
        optim.MuonAdamW.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "ortho_dtype": torch.float32})
    if "attn16" in patches:
        from nanochat import flash_attention

        flash_attention.CPU_ATTENTION_IN_FP32 = False
    if "refloss" in patches:
        gpt.lm_loss = gpt.reference_lm_loss
    if "refadamw" in patches:
        def eager(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
            t = lambda v: torch.tensor(float(v))  # noqa: E731
            optim.adamw_step(p, grad, exp_avg, exp_avg_sq, t(step), t(lr), t(beta1), t(beta2), t(eps), t(wd))
        optim._fused_adamw_cpu = eager
    if emulate:
        from bench.bf16_emulation import EmulatedBF16Matmuls

        # The attention kernel is never emulated: what it does in bf16 (or, shipped, in fp32) is what is measured.
        mode = EmulatedBF16Matmuls(attention=False)
        mode.__enter__()
        return mode
    return None


def _child(variant, seed, steps, threads):
    from nanochat.common import cpu_has_native_bf16

    dtype, patches, _ = VARIANTS[variant]
    emulate = os.environ.get("BENCH_EMULATE") == "1"
    mode = _apply_patches(patches, emulate)
    from scripts import base_train

    flags = [f for f in TRAIN_FLAGS if not f.startswith(("--num-iterations", "--eval-every"))]
    flags += [f"--num-iterations={steps}", f"--eval-every={max(1, steps // 3)}", f"--seed={seed}",
              f"--model-tag=precision-{variant}-{seed}-{os.getpid()}"]
    if threads:
        import torch

        from nanochat import training
        training.configure_cpu_threads = lambda n=None, _f=training.configure_cpu_threads: _f(threads)
        torch.set_num_threads(threads)
    base_train.main(flags)
    if mode is not None:
        missed = dict(mode.missed)
        print(f"bf16 emulation: emulated {sum(mode.counts.values())} matmul calls; unhandled matmul-like ops: {missed or 'none'}",
              file=sys.stderr)
    print(f"native bf16: {cpu_has_native_bf16()}", file=sys.stderr)


# -----------------------------------------------------------------------------
# Parent: launch, parse, summarise


def _emulate_for(variant, mode):
    from nanochat.common import cpu_has_native_bf16

    uses_bf16 = VARIANTS[variant][0] == "bfloat16" or (VARIANTS[variant][0] is None and _default_is_bf16())
    if mode == "off" or not uses_bf16:
        return False
    return mode == "on" or not cpu_has_native_bf16()


def _default_is_bf16():
    import torch

    from nanochat.common import get_compute_dtype

    return get_compute_dtype()[0] == torch.bfloat16


def _launch(variant, seed, args, threads, log_path):
    env = dict(os.environ)
    env.pop("NANOCHAT_DTYPE", None)
    dtype = VARIANTS[variant][0]
    if dtype:
        env["NANOCHAT_DTYPE"] = dtype
    emulated = _emulate_for(variant, args.emulate)
    env["BENCH_EMULATE"] = "1" if emulated else "0"
    cmd = [sys.executable, "-m", "bench.bench_precision_cpu", "--child", variant, str(seed), "--steps", str(args.steps),
           "--threads", str(threads)]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, emulated


def parse_log(text):
    """{val: {step: bpb}, losses: {step: loss}, dts: [ms], train_minutes}. Raises if the run did not finish."""
    val = {int(s): float(b) for s, b in _VAL.findall(text)}
    losses, dts = {}, []
    for s, loss, dt in _STEP.findall(text):
        losses[int(s)] = float(loss)
        dts.append(float(dt))
    if _TIME.search(text) is None:
        raise RuntimeError("run did not finish:\n" + text[-3000:])
    # Training time = every step's dt (base_train's own total leaves out the first 10 steps).
    return dict(val=val, losses=losses, dts=dts, train_minutes=sum(dts) / 60_000)


def _spike(losses, upto=50):
    """Largest rise of the (smoothed) train loss between consecutive logged steps in the first `upto` steps."""
    steps = sorted(s for s in losses if s <= upto)
    return max([losses[b] - losses[a] for a, b in zip(steps, steps[1:])] + [0.0])


def _time_to(run, target):
    """Training seconds (sum of step times) until the first val eval at or below `target`, or None."""
    for step in sorted(run["val"]):
        if run["val"][step] <= target + 1e-12:
            return sum(run["dts"][:step]) / 1000
    return None


def summarise(runs, variants, seeds):
    """Print the per-run and per-variant tables; returns the summary dict."""
    eval_steps = sorted(next(iter(runs.values()))["val"])
    print(f"\nval bpb at steps {eval_steps[1:]}, per run:")
    for (variant, seed), r in sorted(runs.items()):
        curve = " ".join(f"{r['val'][s]:.4f}" for s in eval_steps[1:])
        tok_s = 4096 * 1000 / statistics.median(r["dts"][10:] or r["dts"])
        emu = " (bf16 emulated: tok/s not meaningful)" if r["emulated"] else ""
        print(f"  {variant:>20} seed {seed}: {curve} | median tok/s {tok_s:,.0f} | early loss rise {_spike(r['losses']):.3f}{emu}")
    fp32_final = {seed: runs[("fp32", seed)]["val"][eval_steps[-1]] for seed in seeds if ("fp32", seed) in runs}
    summary = {}
    print("\nper variant (mean ± half-range over seeds; gap = mean relative gap to fp32 at the same seed):")
    for variant in variants:
        rs = [(seed, runs[(variant, seed)]) for seed in seeds if (variant, seed) in runs]
        row = {}
        for s in eval_steps[1:]:
            vals = [r["val"][s] for _, r in rs]
            gaps = [r["val"][s] / runs[("fp32", seed)]["val"][s] - 1 for seed, r in rs if ("fp32", seed) in runs]
            row[s] = dict(mean=statistics.mean(vals), spread=(max(vals) - min(vals)) / 2,
                          gap=statistics.mean(gaps) if gaps else None, max_gap=max(gaps) if gaps else None)
        times = [_time_to(r, fp32_final[seed]) for seed, r in rs if seed in fp32_final]
        fp32_times = [runs[("fp32", seed)]["train_minutes"] * 60 for seed, _ in rs if seed in fp32_final]
        ratio = None
        if times and None not in times:
            ratio = statistics.mean(t / f for t, f in zip(times, fp32_times))
        summary[variant] = dict(curve=row, time_to_fp32_final_ratio=ratio,
                                train_minutes=[r["train_minutes"] for _, r in rs], emulated=any(r["emulated"] for _, r in rs))
        cells = " | ".join(f"@{s} {c['mean']:.4f}±{c['spread']:.4f}" + (f" ({100 * c['gap']:+.2f}%, worst {100 * c['max_gap']:+.2f}%)" if c["gap"] is not None else "")
                           for s, c in row.items())
        reach = "never reaches the fp32 final bpb" if times and None in times else (f"time to fp32's final bpb: {ratio:.2f}x fp32" if ratio is not None else "")
        print(f"  {variant:>20}: {cells} | {reach}")
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), args.steps, args.threads)
        return None
    if args.list:
        for name, (dtype, patches, desc) in VARIANTS.items():
            print(f"{name:>20}: {desc}")
        return None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; --list shows the choices")
    if "fp32" not in variants:
        variants.append("fp32")  # every comparison is against fp32
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if args.steps < 3 or args.jobs < 1:
        raise SystemExit("--steps must be >= 3 and --jobs >= 1")
    os.makedirs(args.out_dir, exist_ok=True)
    threads = args.threads or (1 if args.jobs > 1 else 0)
    todo = [(v, s) for s in seeds for v in variants]
    running, runs = [], {}
    t0 = time.time()
    while todo or running:
        while todo and len(running) < args.jobs:
            variant, seed = todo.pop(0)
            log_path = os.path.join(args.out_dir, f"{variant}-{seed}.log")
            if args.reuse and os.path.exists(log_path):
                try:
                    text = open(log_path).read()
                    runs[(variant, seed)] = dict(parse_log(text), emulated="bf16 emulation:" in text)
                    print(f"reused {log_path}", flush=True)
                    continue
                except RuntimeError:
                    pass  # unfinished: run it again
            proc, log, emulated = _launch(variant, seed, args, threads, log_path)
            running.append((variant, seed, proc, log, log_path, emulated))
            print(f"[{time.time() - t0:6.0f}s] started {variant} seed {seed}" + (" (bf16 emulated)" if emulated else ""), flush=True)
        time.sleep(2)
        for item in list(running):
            variant, seed, proc, log, log_path, emulated = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            text = open(log_path).read()
            if proc.returncode != 0:
                raise SystemExit(f"{variant} seed {seed} failed (exit {proc.returncode}); log: {log_path}\n{text[-2000:]}")
            runs[(variant, seed)] = dict(parse_log(text), emulated=emulated)
            print(f"[{time.time() - t0:6.0f}s] finished {variant} seed {seed}: val bpb {runs[(variant, seed)]['val']}", flush=True)
    summary = summarise(runs, variants, seeds)
    out = dict(config=TRAIN_FLAGS, steps=args.steps, seeds=seeds, load_avg=os.getloadavg(), summary=summary,
               runs={f"{v}/{s}": r for (v, s), r in runs.items()})
    path = os.path.join(args.out_dir, "summary.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
