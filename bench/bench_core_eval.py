"""
CORE evaluation speed: the head run at the scored positions only (model.hidden_states, then model.logits
on those rows) against the full-logits reference (model(idx) at every position), on the same examples.

    python bench/bench_core_eval.py                                    # d4, V=32768, 8 examples x 22 tasks, CPU
    python bench/bench_core_eval.py --repeats 5 --threads 2            # the documented measurement (quiet machine)
    python bench/bench_core_eval.py --batch-tokens 0,2048,8192         # also one example per forward vs batched
    python bench/bench_core_eval.py --device cuda --examples-per-task 64 --batch-tokens 8192
    python bench/bench_core_eval.py --depth 2 --examples-per-task 2 --repeats 1   # a quick dry run

The model is nanochat's GPT built the way base_train builds it (training.config_for_depth, meta device,
to_empty, init_weights, the compute dtype of nanochat.common.get_compute_dtype), randomly initialised:
speed doesn't depend on the weights. The vocabulary is 32768, the size of the tokenizer base_train
trains by default, because the head's cost is what the fast path removes: at depth 4 the lm_head is
8.4M of the 11.5M matmul weights. The eval bundle is synthetic but has the real structure (the 22
CORE tasks with their types, shot counts and delimiters; random-word rows in each type's JSONL format),
tokenised byte by byte, so the model's first 265 ids are the only ones fed.

Every (batch budget, path) mode runs once per repeat, in turn (A, B, A, B, ...), so background load
hits every mode alike. It prints each mode's best and median wall time over the repeats, the ratios
reference / fast, and checks that both paths gave the same per-task accuracy (exits 1 if not). In
fp32 the scores agree to rounding; in bf16 an exact tie between two options could in principle break
differently, which the check would report.
"""

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from nanochat import training  # noqa: E402
from nanochat.core_eval import REFERENCE_TASKS, evaluate_core  # noqa: E402
from nanochat.gpt import GPT  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer  # noqa: E402

WORDS = ("the", "a", "river", "stone", "cloud", "runs", "over", "under", "green", "quick", "slow", "light",
         "house", "city", "moves", "bright", "dark", "water", "fire", "north", "south", "small", "large", "old")
PATHS = (("full logits (reference)", True), ("scored positions only", False))  # (name, full_logits)


def build_parser():
    p = argparse.ArgumentParser(description="CORE eval: lm_head at the scored positions only vs full logits.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model (as base_train builds it)")
    g.add_argument("--depth", type=int, default=4, help="model depth (width = 64 x depth rounded up to 128)")
    g.add_argument("--seq-len", type=int, default=512, help="model context; longer prompts keep their last tokens")
    g.add_argument("--vocab-size", type=int, default=32768, help="model output vocabulary (the byte tokenizer feeds the first 265 ids)")
    g.add_argument("--window-pattern", default="SSSL", help="attention window pattern, as base_train")
    g = p.add_argument_group("workload")
    g.add_argument("--examples-per-task", type=int, default=8, help="examples scored per task (22 tasks)")
    g.add_argument("--batch-tokens", type=lambda t: [int(x) for x in t.split(",")], default=[2048],
                   help="comma list of token budgets per forward (0 = one example per forward); both paths run at each")
    g = p.add_argument_group("run")
    g.add_argument("--device", type=str, default="cpu", help="cpu | cuda | mps")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = every core in the affinity mask, as base_train)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per mode, interleaved across modes")
    g.add_argument("--seed", type=int, default=0)
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


class Counters:
    """Forward passes, fed tokens (real vs padding) and lm_head rows, read from hooks on the model's
    embedding and head, so the model keeps its own methods (the fast path needs hidden_states/logits)."""

    def __init__(self, model, pad_id):
        self.pad_id = pad_id
        self.reset()
        model.transformer.wte.register_forward_pre_hook(self._on_embed)  # called once per forward
        model.lm_head.register_forward_hook(self._on_head)

    def reset(self):
        self.forwards = self.fed_tokens = self.real_tokens = self.head_rows = 0

    def _on_embed(self, module, args):
        idx = args[0]  # (B, T)
        self.forwards += 1
        self.fed_tokens += idx.numel()
        # BOS only ever starts a real row, so trailing BOS tokens are padding
        self.real_tokens += (idx != self.pad_id).sum().item() + (idx[:, 0] == self.pad_id).sum().item()

    def _on_head(self, module, args, out):
        self.head_rows += args[0].shape[:-1].numel()


def build_model(args, device):
    """The GPT base_train would build for --depth (random init)."""
    config = training.config_for_depth(args.depth, max_seq_len=args.seq_len, window_pattern=args.window_pattern,
                                       vocab_size=args.vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(args.seed)
    model.init_weights()
    return model.eval()


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cpu":
        training.configure_cpu_threads(args.threads if args.threads > 0 else None)
    tokenizer = RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})
    model = build_model(args, device)
    counters = Counters(model, tokenizer.get_bos_token_id())
    c = model.config
    print(f"model: nanochat GPT d{c.n_layer} (n_embd {c.n_embd}, {c.n_head} heads, window {c.window_pattern}), "
          f"{sum(p.numel() for p in model.parameters()):,} params, context {c.sequence_len}, vocab {c.vocab_size}, "
          f"{str(model.compute_dtype).removeprefix('torch.')}; device {device}, torch threads {torch.get_num_threads()}")
    modes = [(f"{name}, {budget} tokens/forward" if budget > 0 else f"{name}, one example/forward", budget, full)
             for budget in args.batch_tokens for name, full in PATHS]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_examples = args.examples_per_task * len(REFERENCE_TASKS)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_synthetic_bundle(tmp, max(args.examples_per_task, 11), args.seed)  # 10-shot needs 11 rows
        for _, budget, full in modes:  # warm-up: allocator, thread pool, kernel choice
            evaluate_core(model, tokenizer, device, max_per_task=1, bundle_dir=bundle, batch_tokens=budget, full_logits=full)
        timings, outputs, stats = {m: [] for m, _, _ in modes}, {}, {}
        for _ in range(args.repeats):
            for mode, budget, full in modes:  # interleaved: A, B, A, B, ...
                counters.reset()
                sync()
                t0 = time.perf_counter()
                outputs[mode] = evaluate_core(model, tokenizer, device, max_per_task=args.examples_per_task,
                                              bundle_dir=bundle, batch_tokens=budget, full_logits=full)
                sync()
                timings[mode].append(time.perf_counter() - t0)
                stats[mode] = (counters.forwards, counters.real_tokens / counters.fed_tokens, counters.head_rows)
    for mode, _, _ in modes:
        best, median = min(timings[mode]), statistics.median(timings[mode])
        forwards, real, head_rows = stats[mode]
        print(f"{mode:<50} best {best:7.2f} s  median {median:7.2f} s of {args.repeats}  {n_examples / best:7.1f} examples/s  "
              f"{forwards:4d} forwards  {real:6.1%} of fed tokens real  {head_rows:8,d} lm_head rows  "
              f"CORE {outputs[mode]['core_metric']:.6f}")
    for budget in args.batch_tokens:
        ref, fast = (next(m for m, b, f in modes if b == budget and f == full) for _, full in PATHS)
        print(f"speedup at {budget} tokens/forward (reference / scored positions only): "
              f"best {min(timings[ref]) / min(timings[fast]):.2f}x, "
              f"median {statistics.median(timings[ref]) / statistics.median(timings[fast]):.2f}x over {n_examples} examples")
    base = modes[0][0]
    differ = sorted({label for mode, _, _ in modes[1:] for label, acc in outputs[mode]["results"].items()
                     if acc != outputs[base]["results"][label]})
    if differ:
        print(f"ACCURACY DIFFERS between modes on: {', '.join(differ)}")
        return 1
    print(f"per-task accuracy identical in every mode ({len(outputs[base]['results'])} tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
