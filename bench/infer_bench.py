"""
Inference benchmark: what prefill and decoding cost through the Engine, swept over decode batch sizes.

    python -m bench.infer_bench                                   # base checkpoint: largest tag, last step
    python -m bench.infer_bench -i sft -g d20 --batch-sizes 1,8,32,128 --json
    python -m bench.infer_bench --random-init --depth 4 --prompt-tokens 128 --decode-tokens 128   # no checkpoint

For each batch size it streams one Engine generation: the first next() (prefill at batch 1, the cache
copied to every row, the first sample) is the time to first token (TTFT), every further next() is one
decode step. Right after it, the same decode positions go through a bare cached forward loop,
`model.forward(ids, kv_cache=cache)`: what the model alone costs, so "eng/fwd" is the Engine's own
overhead (sampling, the tool state machine, Python). The whole sweep runs --repeats rounds (A, B, A, B...)
and the step times of all rounds are pooled: medians hold up on a shared, noisy machine.

Columns: TTFT; TPOT = the median decode step; fwd = the median bare forward step; tok/s = batch / TPOT;
MBU = the bytes a decode step must read (the weights it streams, plus every row's KV cache at the
mid-decode context) per TPOT, over the GPU's peak bandwidth (n/a on CPU: no reliable peak); MFU = model
FLOPs per TPOT over the GPU's peak bf16 FLOP/s or, on CPU, over this CPU's fastest 1024^3 matmul in the
compute dtype. Then (--profile, CPU) where a bare decode step's time goes, the Engine's two targets,
PASS/FAIL, and with --json one JSON object as the last line of stdout.

On a shared CPU, `--threads 1 --clock process` times CPU seconds of this process only, which other
processes' time slices do not inflate (their pressure on caches and memory bandwidth still counts).

Tests: python -m pytest tests/test_engine.py -q -k infer_bench
"""

import argparse
import logging
import platform
import statistics
import time
from dataclasses import asdict

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from nanochat.checkpoint_manager import load_model
from nanochat.common import (ConfigError, add_debug_flag, autodetect_device_type, compute_cleanup, compute_init,
                             get_inference_dtype, get_peak_bandwidth, get_peak_flops, script_main,
                             setup_default_logging, strict_json)
from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT
from nanochat.tokenizer import RustBPETokenizer
from nanochat.training import config_for_depth

log = logging.getLogger("nanochat.infer_bench")

SOURCES = ("base", "mid", "sft", "rl")
# The Engine's targets (set on CPU at depth 4, fp32): a decode step through the Engine costs at most 1.3x
# the bare cached forward, i.e. sampling, tools and Python stay small next to the model; and 8 rows
# decode at least 6x the tokens/s of one, i.e. batching is not eaten by per-row work.
MAX_ENGINE_OVERHEAD = 1.3
MIN_BATCH8_SPEEDUP = 6.0
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
PROMPT_TEXT = (
    "The history of science is the study of how people came to understand the natural world. Early "
    "astronomers in Babylon kept careful records of the planets, and Greek thinkers argued about whether "
    "the Earth moved. In the seventeenth century Galileo turned a telescope to the sky, Kepler described "
    "the orbits of the planets, and Newton joined motion on Earth and in the heavens in one set of laws. "
    "Chemistry grew out of alchemy when Lavoisier weighed what burned, and biology changed for good when "
    "Darwin explained how species arise by natural selection. Each advance came from measuring carefully, "
    "doubting old answers and sharing the results so that others could check them."
)


def parse_batch_sizes(text):
    """argparse type for --batch-sizes: a comma list of positive ints, e.g. "1,8,32"."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of positive integers, e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of positive integers, e.g. 1,8,32")
    return sorted(set(sizes))


def build_parser():
    p = argparse.ArgumentParser(description="Prefill and decode speed of the Engine over decode batch sizes.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("-i", "--source", choices=SOURCES, default="base", help="checkpoint family to load")
    g.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint directory tag (default: the largest d<N>)")
    g.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last one)")
    g.add_argument("--random-init", action="store_true",
                   help="no checkpoint: a randomly initialised GPT of --depth, with a byte-level tokenizer whose stop "
                        "tokens are ignored (random weights would stop rows at arbitrary steps)")
    g.add_argument("--depth", type=int, default=4, help="with --random-init: model depth (width etc. as base_train derives them)")
    g.add_argument("--vocab-size", type=int, default=-1,
                   help="with --random-init: vocabulary size (-1 = the byte tokenizer's 265; a larger one runs the Engine "
                        "without tools, since the byte tokenizer cannot decode the extra ids)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="with --random-init: the model's context length")
    g.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    g.add_argument("--threads", type=int, default=0, help="CPU: torch intra-op threads (0 = torch's default)")
    add_debug_flag(g)
    g = p.add_argument_group("workload")
    g.add_argument("--prompt-tokens", type=int, default=2048,
                   help="prompt length (clamped to the model's context minus --decode-tokens)")
    g.add_argument("--decode-tokens", type=int, default=256, help="tokens generated per row")
    g.add_argument("--batch-sizes", type=parse_batch_sizes, default="1,8,32", help="comma list of decode batch sizes")
    g.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, default=-1, help="sample from the top k tokens (-1 = disable)")
    g.add_argument("--seed", type=int, default=42, help="seed of the random init and of sampling")
    g.add_argument("--warmup-tokens", type=int, default=8, help="tokens of the untimed warm-up run per batch size")
    g.add_argument("--repeats", type=int, default=3, help="timed rounds of the whole sweep, interleaved; step times are pooled")
    g.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall: elapsed time; process: CPU seconds of this process, which other processes' time slices on a "
                        "shared machine do not inflate (meaningful with --threads 1 on CPU)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line of stdout")
    g.add_argument("--profile", action="store_true",
                   help="CPU: after the sweep, profile one bare forward run per batch size (matmul / attention / other)")
    return p


# -----------------------------------------------------------------------------
# The model under test


def byte_tokenizer():
    """A merge-free tokenizer (the 256 bytes plus the specials): enough to build prompts and drive the tools."""
    return RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})


class NoStopTokenizer:
    """A tokenizer as the Engine sees it, except that no token ends a row (stop ids -1, never sampled).

    Random weights have no notion of ending a reply: their stop tokens end rows at arbitrary steps (at
    depth 4, after 10 of 64 tokens from a 16-token prompt), leaving little to time. The tool tokens and
    the state machine that watches them work as usual.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_special(self, name):
        return -1 if name == "<|assistant_end|>" else self.tokenizer.encode_special(name)

    def get_bos_token_id(self):
        return -1

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def build_random_model(depth, vocab_size, max_seq_len, device, seed):
    """A GPT the way base_train builds it (config_for_depth, meta device, to_empty, init_weights), in the
    inference dtype of the device, in eval mode."""
    config = config_for_depth(depth, vocab_size=vocab_size, max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=get_inference_dtype(device.type))
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.init_weights()
    return model.eval()


def load(args, device):
    """(model, engine tokenizer or None, prompt tokenizer, description dict) from the flags."""
    if not args.random_init:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        return model, tokenizer, tokenizer, {"source": args.source, "model_tag": args.model_tag, "step": meta["step"]}
    if args.depth < 1:
        raise ConfigError(f"--depth must be >= 1, got {args.depth}")
    tokenizer = byte_tokenizer()
    vocab_size = tokenizer.get_vocab_size() if args.vocab_size == -1 else args.vocab_size
    if vocab_size < tokenizer.get_vocab_size():
        raise ConfigError(f"--vocab-size {vocab_size} is smaller than the byte tokenizer's {tokenizer.get_vocab_size()} "
                          "tokens the prompt is made of; pass -1 or a larger size")
    engine_tokenizer = NoStopTokenizer(tokenizer)
    if vocab_size != tokenizer.get_vocab_size():
        log.info("vocab %d is wider than the byte tokenizer's %d: the Engine runs without tools",
                 vocab_size, tokenizer.get_vocab_size())
        engine_tokenizer = None
    model = build_random_model(args.depth, vocab_size, args.max_seq_len, device, args.seed)
    return model, engine_tokenizer, tokenizer, {"source": "random-init", "model_tag": f"d{args.depth}", "step": None}


def make_prompt(tokenizer, length):
    """BOS and then the science paragraph repeated, cut to exactly `length` tokens."""
    once = len(tokenizer.encode(PROMPT_TEXT))
    text = " ".join([PROMPT_TEXT] * (length // max(once, 1) + 1))
    return tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())[:length]


def device_name(device):
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or device.type


def streamed_weight_bytes(model):
    """Bytes of the parameters every decode step reads in full: all but the embedding tables, of which a
    step only gathers one row per token."""
    gathered = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in gathered)


def cpu_matmul_rate(device, dtype, clock, n=1024, tries=5):
    """This CPU's practical peak: FLOP/s of the fastest of `tries` (n, n) x (n, n) matmuls, timed with the
    run's clock (the fastest, because a shared machine only ever makes one slower)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(tries):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best


def model_card(model, device, prompt_len, decode_tokens, clock=time.perf_counter):
    """Static facts of the run: sizes, bytes and FLOPs per step, the device's peaks (None when unknown)."""
    kv_dtype = model.compute_dtype
    ctx_mid = prompt_len + decode_tokens // 2
    dtypes = {}
    for p in model.parameters():
        dtypes[str(p.dtype).removeprefix("torch.")] = dtypes.get(str(p.dtype).removeprefix("torch."), 0) + p.numel()
    card = {
        "device": device_name(device),
        "device_type": device.type,
        "compute_dtype": str(model.compute_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "num_params": sum(p.numel() for p in model.parameters()),
        "param_dtypes": dtypes,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "streamed_weight_bytes": streamed_weight_bytes(model),
        "kv_bytes_per_token": model.kv_bytes_per_token(kv_dtype),
        "context_mid": ctx_mid,
        "kv_read_bytes_per_step": model.kv_read_bytes(ctx_mid, kv_dtype),
        "decode_flops_per_token": model.estimate_decode_flops(ctx_mid),
        # The Engine runs the head on the last prompt position only.
        "prefill_flops": model.estimate_prefill_flops(prompt_len) - 2 * model.lm_head.weight.numel() * (prompt_len - 1),
        "peak_bandwidth_bytes_per_sec": None,
        "peak_flops_per_sec": None,
        "peak_flops_source": None,
        "total_vram_bytes": None,
        "ceiling_bs1_tok_per_sec": None,
        "max_full_context_rows": None,
    }
    if device.type == "cuda":
        name = card["device"]
        card["peak_bandwidth_bytes_per_sec"] = get_peak_bandwidth(name)
        card["peak_flops_per_sec"] = get_peak_flops(name)
        card["peak_flops_source"] = "datasheet (dense bf16)"
        card["total_vram_bytes"] = torch.cuda.get_device_properties(device).total_memory
        if card["peak_bandwidth_bytes_per_sec"]:
            step_bytes = card["streamed_weight_bytes"] + card["kv_read_bytes_per_step"]
            card["ceiling_bs1_tok_per_sec"] = round(card["peak_bandwidth_bytes_per_sec"] / step_bytes, 1)
        full_row = card["kv_bytes_per_token"] * model.config.sequence_len
        card["max_full_context_rows"] = int((card["total_vram_bytes"] - card["weight_bytes"]) / full_row)
    elif device.type == "cpu":
        card["peak_flops_per_sec"] = cpu_matmul_rate(device, model.compute_dtype, clock)
        card["peak_flops_source"] = f"fastest {card['compute_dtype']} 1024^3 matmul on this CPU"
    return card


# -----------------------------------------------------------------------------
# Timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_engine(engine, prompt, batch, tokens, temperature, top_k, seed, device, clock=time.perf_counter):
    """One streamed generation of `tokens` tokens per row: (TTFT s, [decode step s], peak VRAM bytes or None)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = clock()
    stream = engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=temperature, top_k=top_k, seed=seed)
    next(stream)
    _sync(device)
    ttft = clock() - t0
    steps = []
    t0 = clock()
    for _ in stream:
        _sync(device)
        now = clock()
        steps.append(now - t0)
        t0 = now
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return ttft, steps, peak


@torch.inference_mode()
def prefilled_cache(model, prompt, batch, tokens, device):
    """A batch-row cache with room for `tokens` more positions, holding the prompt as the Engine's would:
    prefilled at batch 1, then copied to every row."""
    cfg = model.config

    def cache(rows, length):
        return KVCache(batch_size=rows, num_heads=cfg.n_kv_head, seq_len=length, head_dim=cfg.n_embd // cfg.n_head,
                       num_layers=cfg.n_layer, device=device, dtype=model.compute_dtype)

    prefill = cache(1, len(prompt))
    model.forward(torch.tensor([prompt], dtype=torch.long, device=device), kv_cache=prefill)
    kv = cache(batch, len(prompt) + tokens)
    kv.prefill(prefill)
    return kv


@torch.inference_mode()
def time_forward(model, prompt, batch, tokens, device, clock=time.perf_counter):
    """The bare model over the same decode positions as time_engine: tokens - 1 cached forwards of a
    (batch, 1) input after the prompt. Returns [step s]."""
    kv = prefilled_cache(model, prompt, batch, tokens, device)
    ids = torch.full((batch, 1), prompt[-1], dtype=torch.long, device=device)  # (B, 1); any token costs the same
    steps = []
    for _ in range(tokens - 1):
        _sync(device)
        t0 = clock()
        model.forward(ids, kv_cache=kv)
        _sync(device)
        steps.append(clock() - t0)
    return steps


# Self CPU time of these ops is what the profile calls matmul / attention; everything else is "other".
PROFILE_GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "attention": ("scaled_dot_product",)}


@torch.inference_mode()
def profile_forward(model, prompt, batch, tokens, device):
    """Where a bare decode step's time goes: {group: ms per step} of torch.profiler's self CPU time (wall
    time inside each op, so load inflates it; read the proportions). The profiler adds a few microseconds
    to every op, so "other", made of many small ops, reads high."""
    kv = prefilled_cache(model, prompt, batch, tokens, device)
    ids = torch.full((batch, 1), prompt[-1], dtype=torch.long, device=device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(tokens - 1):
            model.forward(ids, kv_cache=kv)
    split = dict.fromkeys(("step", *PROFILE_GROUPS, "other"), 0.0)
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / (tokens - 1)
        split["step"] += ms
        group = next((g for g, names in PROFILE_GROUPS.items() if any(n in event.key for n in names)), "other")
        split[group] += ms
    return {k: round(v, 4) for k, v in split.items()}


def summarize(batch, ttfts, engine_steps, forward_steps, steps_per_round, peaks, card, decode_tokens):
    """One sweep row from the pooled measurements of every round."""
    tpot = statistics.median(engine_steps)
    fwd = statistics.median(forward_steps)
    step_bytes = card["streamed_weight_bytes"] + batch * card["kv_read_bytes_per_step"]
    bw, flops = card["peak_bandwidth_bytes_per_sec"], card["peak_flops_per_sec"]
    return {
        "batch_size": batch,
        # Nanoseconds: a sub-millisecond step rounded to microseconds is 0.1% off, and tok/s is derived from it.
        "ttft_sec": round(statistics.median(ttfts), 9),
        "tpot_sec": round(tpot, 9),
        "forward_sec": round(fwd, 9),
        "engine_over_forward": round(tpot / fwd, 4),
        "tok_per_sec": round(batch / tpot, 1),
        "bytes_per_step": step_bytes,
        "mbu_percent": round(100 * step_bytes / tpot / bw, 2) if bw else None,
        "mfu_percent": round(100 * batch * card["decode_flops_per_token"] / tpot / flops, 4) if flops else None,
        "peak_vram_bytes": max(peaks) if peaks[0] is not None else None,
        "decode_steps": min(steps_per_round),
        "early_stop": min(steps_per_round) < decode_tokens - 1,
    }


def check_targets(sweep):
    """The two targets, for whichever of batch 1 and 8 the sweep holds: {name: {value, limit, passed}}."""
    rows = {row["batch_size"]: row for row in sweep}
    targets = {}
    if 1 in rows:
        ratio = rows[1]["tpot_sec"] / rows[1]["forward_sec"]
        targets["engine_over_forward_bs1"] = {"value": round(ratio, 3), "limit": MAX_ENGINE_OVERHEAD,
                                              "passed": ratio <= MAX_ENGINE_OVERHEAD}
    if 1 in rows and 8 in rows:
        ratio = rows[8]["tok_per_sec"] / rows[1]["tok_per_sec"]
        targets["tok_per_sec_bs8_over_bs1"] = {"value": round(ratio, 3), "limit": MIN_BATCH8_SPEEDUP,
                                               "passed": ratio >= MIN_BATCH8_SPEEDUP}
    return targets


# -----------------------------------------------------------------------------
# Output


def _fmt(value, spec, scale=1.0):
    return "n/a" if value is None else format(value * scale, spec)


def format_report(result):
    """The human-readable report: the card, prefill, the sweep table, the targets."""
    cfg, pre = result["model_config"], result["prefill"]
    gib = 1024 ** 3
    lines = [
        f"model: {result['source']} {result['model_tag'] or ''}"
        + (f" step {result['step']}" if result["step"] is not None else "")
        + f" | n_layer {cfg['n_layer']}, n_embd "
        f"{cfg['n_embd']}, heads {cfg['n_head']}/{cfg['n_kv_head']}, vocab {cfg['vocab_size']}, context {cfg['sequence_len']}",
        f"device: {result['device']} ({result['device_type']}, {result['compute_dtype']}"
        + (f", {result['threads']} thread{'s' if result['threads'] > 1 else ''})" if result["threads"] else ")"),
        f"params: {result['num_params']:,} ({', '.join(f'{k} {v:,}' for k, v in result['param_dtypes'].items())}); "
        f"{result['weight_bytes'] / 2**20:.1f} MiB, of which a decode step streams {result['streamed_weight_bytes'] / 2**20:.1f} MiB",
        f"KV cache: {result['kv_bytes_per_token']:,} B per token per row; a step reads {result['kv_read_bytes_per_step'] / 2**20:.2f} "
        f"MiB per row at the mid-decode context {result['context_mid']}",
        f"peaks: bandwidth {_fmt(result['peak_bandwidth_bytes_per_sec'], '.3g', 1e-9)} GB/s, "
        f"{_fmt(result['peak_flops_per_sec'], '.4g', 1e-12)} TFLOP/s ({result['peak_flops_source'] or 'unknown'})"
        + (f"; batch-1 ceiling {result['ceiling_bs1_tok_per_sec']} tok/s" if result["ceiling_bs1_tok_per_sec"] else "")
        + (f"; {result['max_full_context_rows']} full-context rows fit" if result["max_full_context_rows"] else ""),
        f"workload: prompt {result['prompt_tokens']} tokens, {result['decode_tokens']} generated per row, temperature "
        f"{result['temperature']}, top_k {result['top_k']}, {result['repeats']} interleaved rounds, {result['clock']} clock",
        "",
        f"prefill: {pre['tok_per_sec']:,.1f} tok/s ({pre['time_sec'] * 1e3:.1f} ms for {result['prompt_tokens']} tokens, "
        f"TTFT at batch 1), MFU {_fmt(pre['mfu_percent'], '.2f')} %",
        "",
        f"{'batch':>5} {'TTFT ms':>9} {'TPOT ms':>9} {'fwd ms':>8} {'eng/fwd':>7} {'tok/s':>9} {'MBU %':>6} {'MFU %':>7} "
        f"{'VRAM GiB':>8} {'steps':>6}",
    ]
    for row in result["sweep"]:
        vram = None if row["peak_vram_bytes"] is None else row["peak_vram_bytes"] / gib
        lines.append(f"{row['batch_size']:>5} {row['ttft_sec'] * 1e3:>9.2f} {row['tpot_sec'] * 1e3:>9.3f} "
                     f"{row['forward_sec'] * 1e3:>8.3f} {row['engine_over_forward']:>7.3f} {row['tok_per_sec']:>9,.1f} "
                     f"{_fmt(row['mbu_percent'], '.2f'):>6} {_fmt(row['mfu_percent'], '.3f'):>7} {_fmt(vram, '.2f'):>8} "
                     f"{row['decode_steps']:>6}" + (f" (early stop @ {row['decode_steps']})" if row["early_stop"] else ""))
    if result["profile"]:
        lines += ["", "profile of the bare forward (self CPU ms per decode step, torch.profiler):",
                  f"{'batch':>5} {'step':>8} {'matmul':>8} {'attention':>9} {'other':>8}"]
        lines += [f"{p['batch_size']:>5} {p['step']:>8.3f} {p['matmul']:>8.3f} {p['attention']:>9.3f} {p['other']:>8.3f}"
                  for p in result["profile"]]
    targets = result["targets"]
    if targets:
        lines.append("")
        lines.append("targets:")
    if "engine_over_forward_bs1" in targets:
        t = targets["engine_over_forward_bs1"]
        lines.append(f"  [{'PASS' if t['passed'] else 'FAIL'}] Engine decode step / bare cached forward at batch 1: "
                     f"{t['value']:.2f}x (at most {t['limit']}x)")
    if "tok_per_sec_bs8_over_bs1" in targets:
        t = targets["tok_per_sec_bs8_over_bs1"]
        lines.append(f"  [{'PASS' if t['passed'] else 'FAIL'}] decode tok/s at batch 8 / batch 1: "
                     f"{t['value']:.2f}x (at least {t['limit']}x)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Main


@script_main("infer_bench")
def main(argv=None):
    """Parse the flags, run the benchmark, print the report; returns the result dict (what --json prints)."""
    args = build_parser().parse_args(argv)
    setup_default_logging()
    try:
        return _bench(args)
    finally:
        compute_cleanup()


def _bench(args):
    for flag, value, least in (("--decode-tokens", args.decode_tokens, 2), ("--prompt-tokens", args.prompt_tokens, 1),
                               ("--repeats", args.repeats, 1), ("--warmup-tokens", args.warmup_tokens, 0)):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    device_type = args.device_type or autodetect_device_type()
    ddp, _, _, _, device = compute_init(device_type, seed=args.seed)
    if ddp:
        raise ConfigError("infer_bench measures one device: run it with `python -m bench.infer_bench`, not torchrun")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, engine_tokenizer, prompt_tokenizer, described = load(args, device)
    seq_len = model.config.sequence_len
    prompt_len = min(args.prompt_tokens, seq_len - args.decode_tokens)
    if prompt_len < 1:
        raise ConfigError(f"--decode-tokens {args.decode_tokens} leaves no room for a prompt in the model's context of "
                          f"{seq_len}; lower it")
    if prompt_len < args.prompt_tokens:
        log.info("prompt clamped from %d to %d tokens so that prompt + %d generated fit the context of %d",
                 args.prompt_tokens, prompt_len, args.decode_tokens, seq_len)
    prompt = make_prompt(prompt_tokenizer, prompt_len)
    top_k = args.top_k if args.top_k > 0 else None
    clock = CLOCKS[args.clock]
    card = model_card(model, device, prompt_len, args.decode_tokens, clock)
    engine = Engine(model, engine_tokenizer)

    def generate(batch, tokens):
        return time_engine(engine, prompt, batch, tokens, args.temperature, top_k, args.seed, device, clock)

    log.info("warm-up: prefill, then %d tokens per batch size %s", args.warmup_tokens, args.batch_sizes)
    generate(1, 2)
    if args.warmup_tokens >= 2:
        for batch in args.batch_sizes:
            generate(batch, args.warmup_tokens)
            time_forward(model, prompt, batch, args.warmup_tokens, device, clock)

    prefill_times = []
    runs = {batch: {"ttft": [], "engine": [], "forward": [], "steps": [], "peak": []} for batch in args.batch_sizes}
    for round_idx in range(args.repeats):
        prefill_times.append(generate(1, 1)[0])
        for batch in args.batch_sizes:
            ttft, steps, peak = generate(batch, args.decode_tokens)
            run = runs[batch]
            run["ttft"].append(ttft)
            run["engine"].extend(steps)
            run["steps"].append(len(steps))
            run["peak"].append(peak)
            if steps:  # the bare model over the positions the Engine decoded (fewer when every row stopped early)
                run["forward"].extend(time_forward(model, prompt, batch, len(steps) + 1, device, clock))
            log.info("round %d/%d batch %d: TPOT %.3f ms over %d steps", round_idx + 1, args.repeats, batch,
                     1e3 * statistics.median(steps) if steps else float("nan"), len(steps))

    sweep = []
    for batch in args.batch_sizes:
        run = runs[batch]
        if not run["engine"]:
            log.warning("batch %d: every row stopped at its first token, no decode step to time; skipped", batch)
            continue
        sweep.append(summarize(batch, run["ttft"], run["engine"], run["forward"], run["steps"], run["peak"], card,
                               args.decode_tokens))
    profiles = {}
    if args.profile:
        if device.type != "cpu":
            log.warning("--profile splits CPU op time; on %s that is launch time, not kernel time: skipped", device.type)
        else:
            profiles = {batch: profile_forward(model, prompt, batch, args.decode_tokens, device) for batch in args.batch_sizes}
    prefill_s = statistics.median(prefill_times)
    flops = card["peak_flops_per_sec"]
    result = {
        **described,
        "model_config": asdict(model.config),
        **card,
        "prompt_tokens": prompt_len,
        "decode_tokens": args.decode_tokens,
        "temperature": args.temperature,
        "top_k": top_k,
        "repeats": args.repeats,
        "clock": args.clock,
        "prefill": {"tok_per_sec": round(prompt_len / prefill_s, 1), "time_sec": round(prefill_s, 6),
                    "mfu_percent": round(100 * card["prefill_flops"] / prefill_s / flops, 2) if flops else None},
        "sweep": sweep,
        "targets": check_targets(sweep),
        "profile": [{"batch_size": batch, **split_ms} for batch, split_ms in profiles.items()],
    }
    print(format_report(result))
    if args.json:
        print(strict_json(result))
    return result


if __name__ == "__main__":
    main()
