"""
CPU training-step throughput of the real GPT + MuonAdamW, against this machine's own matmul rates.

Runs full base_train steps (forward, backward, optimizer step, zero_grad) of the model that
`--depth` builds, on random tokens, and in the same process measures the square-matmul rate in fp32
and bf16. Reports tok/s, model FLOP/s (GPT.estimate_flops() x tok/s) as a fraction of both matmul
rates, the fwd/bwd/opt split, and wall vs user vs system CPU time. Unless --no-compare, a second
process repeats the run with NANOCHAT_DTYPE=float32 so the fp32 path shows up as a comparison row.
The target (the "CPU speed" issue): model FLOP/s >= 1.3x the measured fp32 matmul rate.

    python -m bench.bench_train_cpu                                  # d4, T=512, B=8, V=32768, all cores
    python -m bench.bench_train_cpu --steps 20 --threads 2 --json
    python -m bench.bench_train_cpu --dtype float32 --no-compare     # the fp32 path alone
    python -m bench.bench_train_cpu --compile                        # torch.compile the model (inductor C++)

Timings only mean something on a quiet machine: check `uptime` first. On a shared machine, "best ms" (the
fastest timed step, and its model FLOP/s over the fp32 matmul rate) is the least disturbed number; with
2 threads on 2 busy cores every parallel op can wait a scheduler time slice for its second thread.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TARGET_VS_FP32 = 1.3


def build_parser():
    p = argparse.ArgumentParser(description="Full training-step throughput on CPU vs this CPU's measured fp32/bf16 matmul rates.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and batch")
    g.add_argument("--depth", type=int, default=4, help="model depth (width = 64 x depth, as base_train)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per row (also the model's sequence_len)")
    g.add_argument("--batch", type=int, default=8, help="rows per step (device batch)")
    g.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    g.add_argument("--window-pattern", default="SSSL", help="attention window pattern, as base_train")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=10, help="timed training steps")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, optimizer state, compile)")
    g.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = all cores available to this process)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="compute dtype (auto = nanochat's detection)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (inductor C++ backend on CPU)")
    g.add_argument("--matmul-sizes", default="1024,2048", help="square sizes for the matmul-rate probe; the best rate per dtype is used")
    g.add_argument("--matmul-seconds", type=float, default=1.0, help="seconds per matmul-rate probe")
    g.add_argument("--with-loader", action="store_true", help="feed batches from the real tokenizing dataloader (needs a tokenizer and shards in the base dir)")
    g.add_argument("--no-compare", action="store_true", help="skip the fp32 comparison row (a second process)")
    g.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    return p


def measure_matmul_rates(sizes, seconds):
    """{dtype name: best FLOP/s over `sizes`} for fp32 and bf16 square matmuls on this CPU."""
    import torch

    from nanochat.common import measure_matmul_flops

    cpu = torch.device("cpu")
    return {name: max(measure_matmul_flops(cpu, dtype, n=n, seconds=seconds) for n in sizes)
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


def _batches(args, vocab, device):
    """Endless (x, y) batches: random tokens, or the real dataloader with --with-loader."""
    import torch

    if args.with_loader:
        from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
        from nanochat.tokenizer import get_tokenizer

        try:
            tokenizer = get_tokenizer()
        except FileNotFoundError as err:
            raise SystemExit(f"--with-loader needs a trained tokenizer in the base dir ({err}); run `python -m scripts.tok_train` first") from err
        if tokenizer.get_vocab_size() != vocab:
            raise SystemExit(f"--with-loader: the tokenizer has {tokenizer.get_vocab_size():,} tokens but --vocab is {vocab:,}; "
                             f"pass --vocab {tokenizer.get_vocab_size()}")
        yield from tokenizing_distributed_data_loader_bos_bestfit(tokenizer, args.batch, args.seq_len, split="train", device=device)
        return
    gen = torch.Generator().manual_seed(0)
    while True:
        tokens = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=gen)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def run_training(args):
    """Build model + optimizer as base_train does, time `args.steps` full steps. Returns a result dict."""
    import torch

    from nanochat import training
    from nanochat.common import get_compute_dtype
    from nanochat.gpt import GPT

    dtype, reason = get_compute_dtype()
    device = torch.device("cpu")
    config = training.config_for_depth(args.depth, max_seq_len=args.seq_len, window_pattern=args.window_pattern, vocab_size=args.vocab)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    # base_train's defaults at batch-LR scale 1 (the LR values don't change the cost of a step).
    optimizer = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28)
    flops_per_token = model.estimate_flops()
    fwd_model = model
    compile_s = None
    if args.compile:
        fwd_model = torch.compile(model, dynamic=False)
    batches = _batches(args, args.vocab, device)
    phases = {"fwd": 0.0, "bwd": 0.0, "opt": 0.0}
    losses, step_s = [], []

    def step(timed):
        x, y = next(batches)
        t0 = time.perf_counter()
        loss = fwd_model(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if timed:
            step_s.append(t3 - t0)
            phases["fwd"] += t1 - t0
            phases["bwd"] += t2 - t1
            phases["opt"] += t3 - t2
        losses.append(loss.item())

    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        step(False)
    if args.compile:
        compile_s = time.perf_counter() - t_warm
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):
        step(True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    tokens = args.steps * args.batch * args.seq_len
    return dict(dtype=str(dtype).removeprefix("torch."), dtype_reason=reason, threads=torch.get_num_threads(),
                depth=args.depth, n_embd=config.n_embd, seq_len=args.seq_len, batch=args.batch, vocab=args.vocab,
                steps=args.steps, compile=args.compile, compile_warmup_s=compile_s, flops_per_token=flops_per_token,
                wall_s=wall, user_s=r1.ru_utime - r0.ru_utime, sys_s=r1.ru_stime - r0.ru_stime,
                step_ms=1000 * wall / args.steps, best_step_ms=1000 * min(step_s), tok_per_s=tokens / wall,
                model_flops=flops_per_token * tokens / wall,
                best_step_model_flops=flops_per_token * args.batch * args.seq_len / min(step_s),
                phase_ms={k: 1000 * v / args.steps for k, v in phases.items()}, first_loss=losses[0], last_loss=losses[-1])


def _fp32_row(args):
    """The same benchmark with NANOCHAT_DTYPE=float32 in a fresh process (the dtype is decided once per process)."""
    cmd = [sys.executable, "-m", "bench.bench_train_cpu", "--no-compare", "--json", "--dtype", "float32",
           "--depth", str(args.depth), "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--vocab", str(args.vocab),
           "--window-pattern", args.window_pattern, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--matmul-sizes", "0"]
    if args.compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, NANOCHAT_DTYPE="float32"))
    if out.returncode != 0:
        raise RuntimeError(f"fp32 comparison run failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(r, rates):
    ph = r["phase_ms"]
    return (f"{r['dtype']:>8} | {r['tok_per_s']:>8,.0f} | {r['model_flops'] / 1e9:>7.1f} | "
            f"{r['model_flops'] / rates['float32']:>5.2f}x | {r['model_flops'] / rates['bfloat16']:>5.2f}x | "
            f"{r['step_ms']:>7.0f} | {r['best_step_ms']:>6.0f} ({r['best_step_model_flops'] / rates['float32']:.2f}x) | {ph['fwd']:>5.0f} / {ph['bwd']:>5.0f} / {ph['opt']:>5.0f} | "
            f"{r['user_s'] / r['wall_s']:>4.2f} / {r['sys_s'] / r['wall_s']:>4.2f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if min(args.depth, args.seq_len, args.batch, args.vocab, args.steps) < 1 or args.warmup < 0 or args.threads < 0:
        raise SystemExit("--depth, --seq-len, --batch, --vocab and --steps must be >= 1; --warmup and --threads >= 0")
    if args.dtype != "auto":
        os.environ["NANOCHAT_DTYPE"] = args.dtype  # read once by nanochat.common.get_compute_dtype
    try:
        sizes = [int(s) for s in args.matmul_sizes.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--matmul-sizes must be comma-separated integers, got {args.matmul_sizes!r}") from None
    import torch

    from nanochat.common import usable_cores
    from nanochat.training import configure_cpu_threads

    configure_cpu_threads(args.threads or None)
    result = run_training(args)
    if sizes == [0]:  # comparison child: the parent measures the matmul rates
        print(json.dumps(result))
        return result
    rates = measure_matmul_rates(sizes, args.matmul_seconds)
    rows = [result]
    if not args.no_compare and result["dtype"] != "float32":
        rows.append(_fp32_row(args))
    for r in rows:
        r["vs_fp32_matmul"] = r["model_flops"] / rates["float32"]
        r["vs_bf16_matmul"] = r["model_flops"] / rates["bfloat16"]
    load = os.getloadavg()
    print(f"CPU training step: depth {args.depth} (d={result['n_embd']}), T={args.seq_len}, B={args.batch}, V={args.vocab:,}, "
          f"threads {result['threads']} of {usable_cores()} cores, torch {torch.__version__}, load avg {load[0]:.2f}")
    print(f"model FLOPs/token {result['flops_per_token']:.3e}; measured matmul rates (best of n={args.matmul_sizes}): "
          f"fp32 {rates['float32'] / 1e9:.1f} GFLOP/s, bf16 {rates['bfloat16'] / 1e9:.1f} GFLOP/s")
    if result["compile_warmup_s"] is not None:
        print(f"torch.compile: the {args.warmup} warm-up steps (compile included) took {result['compile_warmup_s']:.1f}s")
    print("   dtype |    tok/s | GFLOP/s | /fp32 | /bf16 | step ms | best ms (/fp32) | fwd / bwd / opt ms   | user/sys per wall")
    for r in rows:
        print(_row(r, rates))
    verdict = "reached" if result["vs_fp32_matmul"] >= TARGET_VS_FP32 else "NOT reached"
    print(f"target model FLOP/s >= {TARGET_VS_FP32}x fp32 matmul: {verdict} ({result['vs_fp32_matmul']:.2f}x); "
          f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}")
    if args.json:
        print(json.dumps(dict(rates=rates, load_avg=load, runs=rows)))
    return dict(rates=rates, runs=rows)


if __name__ == "__main__":
    main()
