"""
The continuous batch without HTTP: BatchScheduler driven in this process (worker=False), 16 requests at once
against 1, on the random-init models of bench_serve (same prompts, sampling and reply length). It isolates the
decode step from the server: tokens/s and ms per step, and their ratio, per depth.

    python -m bench.bench_batch_step                          # depths 2 and 4, 5 interleaved rounds
    python -m bench.bench_batch_step --tree /path/to/other    # the same, importing nanochat from another checkout

--tree makes A/B runs of two checkouts comparable: run both on one quiet machine, one after the other or
interleaved, and compare medians. Every round also reports how much of the 16 batched replies equals what the same
seeded requests get alone (all of it on the tests' tiny models; a real model's batched arithmetic rounds
differently from one row's, which can flip a near-tie late in a reply).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def build_parser():
    p = argparse.ArgumentParser(description="In-process continuous batching: 16 requests at once vs one at a time.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, nargs="+", default=[2, 4], help="depths of the random-init models")
    p.add_argument("--streams", type=int, default=16, help="requests in the batch")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens each reply generates")
    p.add_argument("--rounds", type=int, default=5, help="interleaved (batched, one-at-a-time) rounds")
    p.add_argument("--tree", default=None, help="import nanochat from this checkout instead of this one")
    return p


def run_round(model, tokenizer, prompts, max_tokens, streams, max_batch):
    """(seconds, decode steps, replies) for `streams` requests through a scheduler of `max_batch` rows."""
    from nanochat.batching import BatchScheduler

    scheduler = BatchScheduler(model, tokenizer, max_batch=max_batch, worker=False)
    replies = [[] for _ in range(streams)]
    for i in range(streams):  # bench_serve's sampling: temperature 0.8, top-k 50, one seed per request
        scheduler.submit(prompts[i], max_tokens=max_tokens, temperature=0.8, top_k=50, seed=i,
                         deliver=lambda item, out=replies[i]: out.append(item) if isinstance(item, list) else None)
    t0, steps = time.perf_counter(), 0
    while scheduler.step():
        steps += 1
    return time.perf_counter() - t0, steps, replies


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.tree:
        if not os.path.isfile(os.path.join(args.tree, "nanochat", "__init__.py")):
            raise SystemExit(f"--tree {args.tree}: no nanochat package there; name the root of a nanochat checkout")
        sys.path.insert(0, os.path.abspath(args.tree))
    import torch

    torch.set_num_threads(1)  # as bench_serve's server
    from bench.bench_serve import SENTENCE, write_random_chat_model
    from nanochat.checkpoint_manager import load_model
    import nanochat

    print(f"nanochat from {os.path.dirname(nanochat.__file__)}; torch {torch.__version__}; {args.streams} requests x "
          f"{args.max_tokens} tokens; {args.rounds} rounds", flush=True)
    results = []
    for depth in args.depth:
        with tempfile.TemporaryDirectory() as base:
            os.environ["NANOCHAT_BASE_DIR"] = base
            source, tag = write_random_chat_model(base, depth, 0)
            model, tokenizer, _ = load_model(source, torch.device("cpu"), phase="eval", model_tag=tag)
            bos = tokenizer.get_bos_token_id()
            prompts = [tokenizer.encode(f"Request {i}: " + SENTENCE * (1 + i % 4), prepend=bos) for i in range(args.streams)]
            run_round(model, tokenizer, prompts, 8, args.streams, args.streams)  # warm-up
            ratios, batched_ms, alone_ms, agreement = [], [], [], []
            for r in range(args.rounds):
                tb, steps, together = run_round(model, tokenizer, prompts, args.max_tokens, args.streams, args.streams)
                ta, _, alone = run_round(model, tokenizer, prompts, args.max_tokens, args.streams, 1)
                tokens = sum(len(reply) for reply in together)
                # Tokens up to each reply's first difference: a batch's matmuls and masked attention round
                # differently from one row's, which can flip a near-tie late in a reply.
                same = sum(next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(together, alone))
                agreement.append(same / tokens)
                ratios.append(ta / tb)
                batched_ms.append(1e3 * tb / steps)
                alone_ms.append(1e3 * ta / tokens)
                print(f"d{depth} round {r + 1}: batched {tokens / tb:,.0f} tok/s ({batched_ms[-1]:.2f} ms/step), "
                      f"alone {tokens / ta:,.0f} tok/s ({alone_ms[-1]:.2f} ms/token), ratio {ratios[-1]:.2f}x, "
                      f"replies equal to alone up to {100 * agreement[-1]:.1f}% of their tokens", flush=True)
            row = {"depth": depth, "ratio_median": statistics.median(ratios), "batched_ms_per_step": statistics.median(batched_ms),
                   "alone_ms_per_token": statistics.median(alone_ms), "agreement_min": min(agreement)}
            print(f"d{depth}: median ratio {row['ratio_median']:.2f}x, batched {row['batched_ms_per_step']:.2f} ms/step, "
                  f"alone {row['alone_ms_per_token']:.2f} ms/token", flush=True)
            results.append(row)
    print(json.dumps({"bench": "batch_step", "streams": args.streams, "max_tokens": args.max_tokens, "results": results}))
    return results


if __name__ == "__main__":
    main()
