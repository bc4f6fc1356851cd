"""
Pretraining data loader throughput on ONE core: read parquet, tokenize (1 encoder thread), pack
BOS-aligned best-fit rows, build the resume state. Reports tokens/s delivered to training; the
target is >= 300k tokens/s with a 32,768-token vocabulary, i.e. one core keeps a GPU step fed.

    python -m bench.bench_dataloader                               # <base>/tokenizer, <base>/base_data_climbmix
    python -m bench.bench_dataloader --tokenizer-dir DIR --data-dir DIR --batches 40 --json

Needs a trained tokenizer (`python -m scripts.tok_train`, --tokenizer-dir, or --train-tokenizer with rustbpe) and shards
(`python -m nanochat.dataset -n 2`, or `python -m nanochat.dataset offline` without network).
Timings are only meaningful on a quiet machine. "cropped away" compares tokens encoded with tokens
delivered during the timed window; the buffer's fill differs at its two ends, so it is approximate
for short runs (about 35% at T=2048 over long ones).
"""

import argparse
import json
import os
import sys
import time


def build_parser():
    p = argparse.ArgumentParser(description="Tokenize + best-fit pack throughput of nanochat.dataloader on one core.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("inputs")
    src.add_argument("--tokenizer-dir", default=None, help="dir with tokenizer.pkl (default: <base>/tokenizer)")
    src.add_argument("--data-dir", default=None, help="dir with parquet shards (default: <base>/base_data_climbmix)")
    src.add_argument("--split", default="train", choices=["train", "val"])
    src.add_argument("--train-tokenizer", action="store_true",
                     help="no saved tokenizer: train one (--expected-vocab tokens, needs rustbpe) in memory on the shards")
    src.add_argument("--train-chars", type=int, default=20_000_000, help="characters of text for --train-tokenizer")
    shape = p.add_argument_group("loader")
    shape.add_argument("-B", "--device-batch-size", type=int, default=32, help="rows per batch")
    shape.add_argument("-T", "--seq-len", type=int, default=2048, help="tokens per row")
    shape.add_argument("--buffer-size", type=int, default=1000, help="documents kept for best-fit packing")
    shape.add_argument("--tokenizer-batch-size", type=int, default=128, help="documents per encode call")
    shape.add_argument("--tokenizer-threads", type=int, default=1, help="encoder threads")
    run = p.add_argument_group("run")
    run.add_argument("--batches", type=int, default=30, help="timed batches")
    run.add_argument("--warmup", type=int, default=2, help="untimed batches first (the first one fills the buffer)")
    run.add_argument("--cores", type=int, default=1, help="pin the process to this many cores (-1 = leave as is)")
    run.add_argument("--expected-vocab", type=int, default=32768, help="warn when the tokenizer's vocab differs")
    run.add_argument("--target", type=float, default=300_000, help="tokens/s the loader should reach")
    run.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    return p


class _CountingTokenizer:
    """Forwards to the real tokenizer and counts tokens and seconds spent encoding."""

    def __init__(self, inner):
        self.inner, self.tokens, self.seconds = inner, 0, 0.0

    def get_bos_token_id(self):
        return self.inner.get_bos_token_id()

    def encode(self, texts, prepend=None, num_threads=8):
        t0 = time.perf_counter()
        rows = self.inner.encode(texts, prepend=prepend, num_threads=num_threads)
        self.seconds += time.perf_counter() - t0
        self.tokens += sum(len(r) for r in rows)
        return rows


def _training_texts(data_dir, max_chars):
    from nanochat.dataset import parquets_iter_batched

    seen = 0
    for texts in parquets_iter_batched("train", data_dir=data_dir):
        for text in texts:
            if text is None:
                continue
            yield text
            seen += len(text)
            if seen >= max_chars:
                return


def _load_tokenizer(args):
    from nanochat.common import get_base_dir
    from nanochat.tokenizer import RustBPETokenizer, TokenizerNotFoundError

    tokenizer_dir = args.tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    try:
        return RustBPETokenizer.from_directory(tokenizer_dir)
    except TokenizerNotFoundError as e:
        if not args.train_tokenizer:
            raise SystemExit(f"bench_dataloader: {e} (or pass --tokenizer-dir, or --train-tokenizer)") from None
    print(f"training a {args.expected_vocab:,}-token tokenizer on {args.train_chars:,} characters...", file=sys.stderr)
    try:
        return RustBPETokenizer.train_from_iterator(_training_texts(args.data_dir, args.train_chars), args.expected_vocab)
    except ImportError as e:
        raise SystemExit(f"bench_dataloader: --train-tokenizer needs rustbpe: {e}") from None


def _pin_cores(n):
    if n < 1 or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cores)
    return cores


def main(argv=None):
    args = build_parser().parse_args(argv)
    cores = _pin_cores(args.cores)
    import torch

    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit
    from nanochat.dataset import DatasetError

    torch.set_num_threads(max(1, args.cores))
    try:
        tokenizer = _load_tokenizer(args)
    except DatasetError as e:
        raise SystemExit(f"bench_dataloader: {e}") from None
    vocab = tokenizer.get_vocab_size()
    if vocab != args.expected_vocab:
        print(f"warning: the tokenizer has {vocab:,} tokens, not {args.expected_vocab:,}: throughput depends on the vocab",
              file=sys.stderr)
    counting = _CountingTokenizer(tokenizer)
    B, T = args.device_batch_size, args.seq_len
    try:
        loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
            counting, B, T, args.split, tokenizer_threads=args.tokenizer_threads,
            tokenizer_batch_size=args.tokenizer_batch_size, device="cpu", buffer_size=args.buffer_size,
            data_dir=args.data_dir, prefetch=0)
        t0 = time.perf_counter()
        for _ in range(max(1, args.warmup)):
            next(loader)
    except DatasetError as e:
        raise SystemExit(f"bench_dataloader: {e}") from None
    warmup_s = time.perf_counter() - t0

    tokens0, encode0 = counting.tokens, counting.seconds
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        _, _, state = next(loader)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    delivered = B * T * args.batches
    encoded = counting.tokens - tokens0
    encode_s = counting.seconds - encode0
    results = {
        "vocab_size": vocab, "B": B, "T": T, "batches": args.batches, "cores": len(cores) if cores else None,
        "tokenizer_threads": args.tokenizer_threads, "warmup_s": round(warmup_s, 3), "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3), "tokens_per_s": round(delivered / wall), "tokens_per_cpu_s": round(delivered / cpu), "encoded_tokens_per_s": round(encoded / wall),
        "encode_share": round(encode_s / wall, 3), "cropped_fraction": round(1 - delivered / encoded, 3) if encoded else None,
        "state_bytes": len(json.dumps(state)), "target_tokens_per_s": args.target,
    }
    print(f"data loader, {results['cores'] or 'all'} core(s), vocab {vocab:,}, B={B} T={T}, {args.batches} batches")
    print(f"  delivered      {delivered / wall:>12,.0f} tokens/s   (wall {wall:.2f} s, cpu {cpu:.2f} s)")
    # On a busy machine the process gets less than its core: the CPU-time rate is what a free core would do.
    print(f"  per CPU second {delivered / cpu:>12,.0f} tokens/s   (this process's own CPU time)")
    print(f"  tokenized      {encoded / wall:>12,.0f} tokens/s   (encode is {100 * encode_s / wall:.0f}% of the time)")
    if encoded:
        print(f"  cropped away   {100 * (1 - delivered / encoded):>11.1f} %   (tokens tokenized but not delivered)")
    print(f"  resume state   {results['state_bytes']:>12,} bytes of JSON")
    verdict = "meets" if delivered / wall >= args.target else "MISSES"
    print(f"  {verdict} the target of {args.target:,.0f} tokens/s")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
