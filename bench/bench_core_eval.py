"""
CORE evaluation throughput: examples per second with several examples per forward pass (ours) versus
one forward per example (upstream's way), on a tiny model (CPU by default).

    python bench/bench_core_eval.py                       # depth 2, 8 examples x 22 tasks, CPU
    python bench/bench_core_eval.py --depth 4 --examples-per-task 16 --batch-tokens 16384
    python bench/bench_core_eval.py --device cuda --examples-per-task 64

The eval bundle is synthetic but has the real structure: the 22 CORE tasks with their types, shot
counts and delimiters, random-word rows in each type's JSONL format, and a byte-level tokenizer. The
model is nanochat's GPT when nanochat/gpt.py is importable, otherwise a small stand-in transformer.
It reports examples/s per mode (best of --repeats interleaved runs), the speed ratios, and whether every
mode gave the same per-task accuracy (exactly so in fp32; in bf16 a near-tie may flip).
"""

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from nanochat.core_eval import REFERENCE_TASKS, evaluate_core  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer  # noqa: E402

WORDS = ("the", "a", "river", "stone", "cloud", "runs", "over", "under", "green", "quick", "slow", "light",
         "house", "city", "moves", "bright", "dark", "water", "fire", "north", "south", "small", "large", "old")


def build_parser():
    p = argparse.ArgumentParser(description="CORE eval throughput: batched vs one forward per example.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, default=2, help="model depth (width = 64 * depth)")
    p.add_argument("--seq-len", type=int, default=512, help="model context; longer prompts are left-truncated")
    p.add_argument("--vocab-size", type=int, default=8192, help="model output vocabulary (the tokenizer uses the first 265 ids)")
    p.add_argument("--examples-per-task", type=int, default=8, help="examples scored per task (22 tasks)")
    p.add_argument("--batch-tokens", type=lambda t: [int(x) for x in t.split(",")], default=[2048, 8192],
                   help="comma list of token budgets per forward for the batched runs (0 = one example per forward is always run)")
    p.add_argument("--device", type=str, default="cpu", help="cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode, interleaved; the fastest counts (noisy machines)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _row(rng, task_type):
    if task_type == "multiple_choice":
        k = rng.choice((2, 4))
        return {"query": _words(rng, rng.randint(8, 24)), "choices": [_words(rng, rng.randint(1, 6)) for _ in range(k)], "gold": rng.randrange(k)}
    if task_type == "schema":
        return {"context_options": [_words(rng, rng.randint(5, 12)) for _ in range(2)], "continuation": _words(rng, rng.randint(3, 8)), "gold": rng.randrange(2)}
    return {"context": _words(rng, rng.randint(8, 30)), "continuation": _words(rng, rng.randint(1, 3))}


def write_synthetic_bundle(root, rows_per_task, seed):
    """The 22 reference tasks with random rows; returns the bundle dir."""
    rng = random.Random(seed)
    bundle = os.path.join(root, "eval_bundle")
    yaml_lines = ["icl_tasks:"]
    csv_lines = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    for label, task_type, shots, delim, baseline, _ in REFERENCE_TASKS:
        uri = f"synthetic/{label}.jsonl"
        yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                       f"  icl_task_type: {task_type}", f"  continuation_delimiter: {json.dumps(delim)}"]
        csv_lines.append(f"{label},synthetic,{task_type},{shots},{rows_per_task},{baseline:g},Yes,synthetic")
        os.makedirs(os.path.join(bundle, "eval_data", "synthetic"), exist_ok=True)
        with open(os.path.join(bundle, "eval_data", uri), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(_row(rng, task_type)) + "\n" for _ in range(rows_per_task))
    with open(os.path.join(bundle, "core.yaml"), "w", encoding="utf-8") as f:
        f.write("\n".join(yaml_lines) + "\n")
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(csv_lines) + "\n")
    return bundle


class StandInGPT(nn.Module):
    """Pre-norm causal transformer used only when nanochat.gpt is not available yet."""

    def __init__(self, depth, width, heads, vocab_size, seq_len):
        super().__init__()
        self.config = type("Cfg", (), {"sequence_len": seq_len})()
        self.heads = heads
        self.wte = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(width, 3 * width, bias=False), "proj": nn.Linear(width, width, bias=False),
                                                   "fc": nn.Linear(width, 4 * width, bias=False), "out": nn.Linear(4 * width, width, bias=False)})
                                    for _ in range(depth))
        self.lm_head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx)
        for blk in self.blocks:
            q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in blk["qkv"](F.rms_norm(x, (x.size(-1),))).chunk(3, dim=-1))
            x = x + blk["proj"](F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1))
            x = x + blk["out"](F.relu(blk["fc"](F.rms_norm(x, (x.size(-1),)))).square())
        return self.lm_head(F.rms_norm(x, (x.size(-1),))).float()


class CountingModel(nn.Module):
    """Counts forward passes and real vs padded tokens (pad = BOS, which only ever starts a real row)."""

    def __init__(self, model, pad_id):
        super().__init__()
        self.model, self.pad_id, self.config = model, pad_id, model.config
        self.forwards = self.padded_tokens = self.real_tokens = 0

    def forward(self, idx):
        self.forwards += 1
        self.padded_tokens += idx.numel()
        # every row's BOS is real; trailing BOS tokens are padding
        real = (idx != self.pad_id).sum().item() + (idx[:, 0] == self.pad_id).sum().item()
        self.real_tokens += real
        return self.model(idx)


def build_model(depth, seq_len, vocab_size, device):
    width = 64 * depth
    heads = max(1, width // 64)
    try:
        from nanochat.gpt import GPT, GPTConfig
    except ImportError as e:
        print(f"nanochat.gpt not importable ({e}); using a stand-in transformer of the same shape")
        torch.manual_seed(0)
        return StandInGPT(depth, width, heads, vocab_size, seq_len).to(device).eval(), "stand-in transformer"
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=heads, n_kv_head=heads,
                       n_embd=width, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model.eval(), "nanochat GPT"


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})
    device = torch.device(args.device)
    inner, kind = build_model(args.depth, args.seq_len, args.vocab_size, device)
    model = CountingModel(inner, tokenizer.get_bos_token_id())
    n_params = sum(p.numel() for p in inner.parameters())
    print(f"model: {kind}, depth {args.depth}, {n_params:,} params, context {args.seq_len}, vocab {args.vocab_size}; "
          f"device {device}, torch threads {torch.get_num_threads()}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_synthetic_bundle(tmp, max(args.examples_per_task, 11), args.seed)  # 10-shot needs 11 rows
        n_examples = args.examples_per_task * len(REFERENCE_TASKS)
        evaluate_core(model, tokenizer, device, max_per_task=2, bundle_dir=bundle, batch_tokens=max(args.batch_tokens))  # warm-up
        modes = [("one forward per example", 0)] + [(f"batched ({b} tokens/forward)", b) for b in args.batch_tokens if b > 0]
        timings, outputs, stats = {m: [] for m, _ in modes}, {}, {}
        for _ in range(args.repeats):
            for mode, budget in modes:  # interleaved, so background load hits both modes alike
                model.forwards = model.padded_tokens = model.real_tokens = 0
                sync()
                t0 = time.perf_counter()
                outputs[mode] = evaluate_core(model, tokenizer, device, max_per_task=args.examples_per_task, bundle_dir=bundle, batch_tokens=budget)
                sync()
                timings[mode].append(time.perf_counter() - t0)
                stats[mode] = (model.forwards, model.real_tokens / model.padded_tokens)
    for mode, _ in modes:
        best = min(timings[mode])
        forwards, real = stats[mode]
        print(f"{mode:<40} best {best:7.2f} s of {args.repeats}  {n_examples / best:8.1f} examples/s  {forwards:5d} forwards  "
              f"{real:6.1%} of fed tokens real  CORE {outputs[mode]['core_metric']:.6f}")
    timings = {m: min(t) for m, t in timings.items()}
    base_mode = modes[0][0]
    for mode, _ in modes[1:]:
        print(f"speedup {mode} / one-per-example: {timings[base_mode] / timings[mode]:.2f}x over {n_examples} examples")
    differ = sorted({label for mode, _ in modes[1:] for label, acc in outputs[mode]["results"].items() if acc != outputs[base_mode]["results"][label]})
    print("per-task accuracy identical in every mode" if not differ else f"accuracy differs between modes on: {', '.join(differ)}")


if __name__ == "__main__":
    main()
