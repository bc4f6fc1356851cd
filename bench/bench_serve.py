"""
Serving under load: N concurrent streaming chats against one replica of `scripts.chat_web`, with continuous
batching (--max-batch N) and, in the same run, with the server limited to one request at a time (--max-batch 1).

    python -m bench.bench_serve                          # random-init depth-2 and depth-4 models, 3 rounds each
    python -m bench.bench_serve --depth 4 --rounds 1     # one model, one round of (batched, one-at-a-time)
    python -m bench.bench_serve -i sft -g d20            # a real checkpoint from NANOCHAT_BASE_DIR instead

Each setting starts the server as a subprocess on 127.0.0.1 (one torch thread by default: --threads), waits
for /health, sends one short warm-up chat, then opens --streams streaming /v1/chat/completions requests at
once (asyncio + httpx, stream_options.include_usage) and measures per request
  TTFT = time from sending the request to its first chunk with content,
  TPOT = (last content chunk - first content chunk) / (completion_tokens - 1),
and overall tokens/s = all completion tokens / (last stream finished - first request sent). An error is a
non-200 answer, an error event, a transport error or a stream without `data: [DONE]`; a reply shorter than
--max-tokens is counted apart ("short"), since a real model may end a reply early.

Random weights (the default) would end replies at random steps: the bench builds each --depth GPT the way
base_train does (config_for_depth, init_weights, the byte tokenizer with its specials: 265 tokens), then gives
the head random rows for the 128 ASCII bytes and zero rows for everything else, so the top-50 (the server's
default top-k, used here at temperature 0.8) is always ASCII and no reply stops before --max-tokens. The
compute per token is that of any model of that depth.

Target, per depth: the median over rounds of batched tokens/s >= 5x one-at-a-time, batched p95 TTFT < 1 s in every
round, 0 errors. Results and load conditions: docs/performance.md, "Serving".
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCE = "tell me a story about the sea. "


def build_parser():
    p = argparse.ArgumentParser(description="Load-test the chat server: continuous batching vs one request at a time.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--streams", type=int, default=16, help="concurrent streaming chats")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens each reply generates")
    p.add_argument("--prompt-scale", type=int, default=1,
                   help="request i asks 'Request i: ' + a 31-character sentence (1 + i %% 4) x this many times")
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of (batched, one-at-a-time), interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    p.add_argument("--depth", type=int, nargs="+", default=[2, 4], help="depths of the random-init models, each benched")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init model")
    p.add_argument("-i", "--source", default=None, help="serve this checkpoint family (sft/rl/...) instead of random init")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag with -i")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a round may take")
    return p


# -----------------------------------------------------------------------------
# The model and the server


def write_random_chat_model(base, depth, seed):
    """A random-init depth-`depth` GPT and the byte tokenizer in `base`, as the SFT checkpoint d<depth>; the head
    writes only ASCII bytes (see the module docstring)."""
    import torch

    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT
    from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes
    from nanochat.training import config_for_depth

    tokenizer = RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})
    tokenizer.save(os.path.join(base, "tokenizer"))
    torch.save(compute_token_bytes(tokenizer), os.path.join(base, "tokenizer", "token_bytes.pt"))
    config = config_for_depth(depth, vocab_size=tokenizer.get_vocab_size())
    with torch.device("meta"):
        model = GPT(config, compute_dtype=torch.float32)
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()
        with torch.no_grad():
            head = model.lm_head.weight  # (V_padded, d); hidden states have RMS 1, so row std 0.3 -> logit std ~0.3 sqrt(d)
            head.zero_()
            head[:128] = 0.3 * torch.randn(128, config.n_embd)
    tag = f"d{depth}"
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", tag), 0, model.state_dict(), None,
                    {"step": 0, "model_config": asdict(config)})
    return "sft", tag


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, source, tag, base, max_batch, log_path):
    """`python -m scripts.chat_web` on 127.0.0.1 with this --max-batch; returns (process, url) once /health is ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "scripts.chat_web", "-i", source, "--device-type", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch), "-t", "0.8", "-k", "50", "-m", str(args.max_tokens)]
    if tag:
        cmd += ["-g", tag]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if base is not None:
        env["NANOCHAT_BASE_DIR"] = base
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}; its log: {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("ready"):
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not get ready within 180 s; its log: {log_path}")


def stop_server(process):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -----------------------------------------------------------------------------
# The load


def message(i, scale):
    """Request i's user message: 44 to 137 characters at scale 1 (one token per byte with the byte tokenizer)."""
    return f"Request {i}: " + SENTENCE * (scale * (1 + i % 4))


async def one_chat(client, url, i, max_tokens, scale):
    """One streaming chat; returns its timings, token count and error (None when it went well)."""
    body = {"model": "nanochat", "messages": [{"role": "user", "content": message(i, scale)}],
            "max_tokens": max_tokens, "temperature": 0.8, "top_k": 50, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = tokens = error = None
    done = False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}"
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = f"error event: {event['error']}"
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if any(choice["delta"].get("content") for choice in event.get("choices", [])):
                    last = time.perf_counter()
                    first = first or last
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and not done:
        error = "the stream ended without [DONE]"
    return {"sent": sent, "first": first, "last": last, "end": time.perf_counter(), "tokens": tokens or 0, "error": error}


async def load(url, streams, max_tokens, scale, timeout):
    limits = httpx.Limits(max_connections=streams + 1, max_keepalive_connections=streams + 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(one_chat(client, url, i, max_tokens, scale) for i in range(streams)))


def percentile(values, q):
    """The q-quantile (0..1) of values, linear between order statistics; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(results, max_tokens):
    ok = [r for r in results if r["error"] is None and r["first"] is not None]
    ttft = [r["first"] - r["sent"] for r in ok]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    wall = max(r["end"] for r in results) - min(r["sent"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "tpot_p50_ms": 1e3 * percentile(tpot, 0.5) if tpot else None,
            "tpot_p95_ms": 1e3 * percentile(tpot, 0.95) if tpot else None,
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "errors": sum(r["error"] is not None for r in results),
            "short": sum(r["error"] is None and r["tokens"] < max_tokens for r in results),
            "first_error": next((r["error"] for r in results if r["error"]), None)}


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def run_setting(args, source, tag, base, max_batch, log_dir):
    process, url = start_server(args, source, tag, base, max_batch, os.path.join(log_dir, f"server-b{max_batch}.log"))
    try:
        asyncio.run(load(url, 1, 8, args.prompt_scale, args.timeout))  # warm-up: first-call costs stay out
        before = loadavg()
        results = asyncio.run(load(url, args.streams, args.max_tokens, args.prompt_scale, args.timeout))
        summary = summarize(results, args.max_tokens)
        summary["load_before"], summary["load_after"] = before, loadavg()
        return summary
    finally:
        stop_server(process)


def show(name, s):
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{name:>16}: TTFT p50 {fmt(s['ttft_p50_s'], '.3f')} s, p95 {fmt(s['ttft_p95_s'], '.3f')} s | "
          f"TPOT p50 {fmt(s['tpot_p50_ms'], '.1f')} ms, p95 {fmt(s['tpot_p95_ms'], '.1f')} ms | "
          f"{s['tokens']} tokens in {s['wall_s']:.2f} s = {s['tokens_per_s']:.1f} tok/s | errors {s['errors']}, "
          f"short {s['short']} | load {s['load_before']} -> {s['load_after']}"
          + (f" | first error: {s['first_error']}" if s["first_error"] else ""))


def bench_model(args, source, tag, base, tmp, name):
    """Interleaved rounds of (batched, one-at-a-time) on one model; its verdict against the target."""
    rounds = []
    for r in range(args.rounds):
        batched = run_setting(args, source, tag, base, args.max_batch, tmp)
        show(f"{name} round {r + 1} batched", batched)
        single = run_setting(args, source, tag, base, 1, tmp)
        show(f"{name} round {r + 1} one-at-a-time", single)
        rounds.append({"batched": batched, "one_at_a_time": single,
                       "ratio": batched["tokens_per_s"] / single["tokens_per_s"]})
    ratio = statistics.median(r["ratio"] for r in rounds)
    worst_ttft = max(r["batched"]["ttft_p95_s"] or float("inf") for r in rounds)
    errors = sum(r["batched"]["errors"] + r["one_at_a_time"]["errors"] for r in rounds)
    passed = ratio >= 5.0 and worst_ttft < 1.0 and errors == 0
    ratios = ", ".join(f"{r['ratio']:.2f}x" for r in rounds)
    print(f"{name}: tokens/s batched / one-at-a-time: {ratios} (median {ratio:.2f}x, target >= 5x); batched p95 "
          f"TTFT (worst round) {worst_ttft:.3f} s (target < 1 s); errors {errors} -> {'PASS' if passed else 'FAIL'}")
    return {"model": name, "rounds": rounds, "ratio_median": ratio, "pass": passed}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if min(args.streams, args.max_tokens, args.max_batch, args.rounds, args.threads, args.prompt_scale, *args.depth) < 1:
        raise SystemExit("--streams, --max-tokens, --max-batch, --rounds, --threads, --prompt-scale and --depth must "
                         "all be >= 1")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    chars = [len(message(i, args.prompt_scale)) for i in range(args.streams)]
    print(f"{args.streams} concurrent streams x {args.max_tokens} tokens, temperature 0.8, top-k 50, messages of "
          f"{min(chars)}-{max(chars)} characters (+5 chat-format tokens); server threads {args.threads}; "
          f"batched --max-batch {args.max_batch} vs --max-batch 1; {args.rounds} rounds")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.source is not None:
            results.append(bench_model(args, args.source, args.model_tag, None, tmp, f"{args.source} {args.model_tag or ''}"))
        for depth in [] if args.source is not None else args.depth:
            base = os.path.join(tmp, f"d{depth}")
            source, tag = write_random_chat_model(base, depth, args.seed)
            print(f"random-init depth-{depth} model (ASCII-only head), byte tokenizer, in {base}")
            results.append(bench_model(args, source, tag, base, tmp, f"d{depth}"))
    passed = all(r["pass"] for r in results)
    print(f"{'PASS' if passed else 'FAIL'}: " + ", ".join(f"{r['model']} {r['ratio_median']:.2f}x" for r in results))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(json.dumps({"bench": "serve", "streams": args.streams, "max_tokens": args.max_tokens,
                      "prompt_scale": args.prompt_scale, "max_batch": args.max_batch, "threads": args.threads,
                      "results": results, "pass": passed}))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
