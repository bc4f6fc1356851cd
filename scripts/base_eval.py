"""
Evaluate a base model: the CORE metric, train/val bits per byte, and a few samples.

One GPU / CPU:   python -m scripts.base_eval
Many GPUs:       torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --device-batch-size=16
Quick CPU look:  python -m scripts.base_eval --device-batch-size=1 --split-tokens=16384 --max-per-task=16
Only CORE:       python -m scripts.base_eval --eval core --model-tag d12 --step 5000

Writes <base>/base_eval/<slug>.csv (per-task accuracy and centered accuracy, CORE last) and the
"Base model evaluation" section of the report. The CORE eval bundle is downloaded on first use
(set NANOCHAT_EVAL_BUNDLE_URL to use a mirror).
"""

import argparse
import logging
import os
import time

from nanochat.checkpoint_manager import add_checkpoint_flags
from nanochat.common import (add_debug_flag, atomic_write, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, script_main, setup_default_logging)
from nanochat.core_eval import EvalBundleError, evaluate_core, format_results_csv
from nanochat.loss_eval import evaluate_splits_bpb
from nanochat.training import eval_steps_for

log = logging.getLogger("nanochat.base_eval")

EVAL_MODES = ("core", "bpb", "sample")  # run in the order sample, bpb, core (cheap and informative first)
SOURCES = ("base", "mid", "sft", "rl")
NUM_UNCONDITIONED = 8


def parse_eval_modes(text):
    """argparse type for --eval: a comma list drawn from core, bpb, sample."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in EVAL_MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(EVAL_MODES)} (unknown: {', '.join(unknown) or 'none given'})")
    return modes


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a base model: CORE metric, train/val bpb, samples.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--eval", type=parse_eval_modes, default="core,bpb,sample", help="comma list of evaluations: core, bpb, sample")
    g = p.add_argument_group("model")
    add_checkpoint_flags(g, default="base", sources=SOURCES)
    g.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    add_debug_flag(g)
    g = p.add_argument_group("CORE")
    g.add_argument("--max-per-task", type=int, default=-1, help="examples scored per task (-1 = all); prompts do not depend on it")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens (rows x padded length) per forward pass; 0 = one example per forward (default: 8192 on CUDA, 2048 elsewhere)")
    g = p.add_argument_group("bits per byte")
    g.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per rank")
    g.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens evaluated per split (rounded down to whole steps)")
    return p


def run_samples(model, tokenizer):
    """Greedy completions of the fixed prompts, then unconditioned samples from BOS alone (rank 0)."""
    from nanochat.engine import complete_prompts, unconditioned_samples

    samples = complete_prompts(model, tokenizer)
    for text in samples:
        log.info("sample: %s", text)
    unconditioned = unconditioned_samples(model, tokenizer, num_samples=NUM_UNCONDITIONED)
    for text in unconditioned:
        log.info("unconditioned: %s", text)
    return samples, unconditioned


@script_main("base_eval")
def main(argv=None):
    """Parse the flags, run the chosen evaluations; returns what was measured (for tests and callers)."""
    args = build_parser().parse_args(argv)
    setup_default_logging()
    try:
        return _evaluate(args)
    finally:
        compute_cleanup()


def _evaluate(args):
    from nanochat import checkpoint_manager
    from nanochat.report import get_report

    _, rank, _, world_size, device = compute_init(args.device_type or autodetect_device_type())
    model, tokenizer, meta = checkpoint_manager.load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    step = meta["step"]
    seq_len = meta["model_config"]["sequence_len"]
    name = f"{args.source}_model (step {step})"
    slug = f"{args.source}_model_{args.model_tag + '_' if args.model_tag else ''}{step:06d}"
    log.info("Evaluating %s (%s) on %s", name, ", ".join(args.eval), device)

    if "bpb" in args.eval:  # check the flags before spending time on the other modes
        steps = eval_steps_for(args.split_tokens, args.device_batch_size, seq_len, world_size, flag="--split-tokens")
        log.info("bpb: %d batches per split = %s tokens (--split-tokens rounded down to whole batches)", steps,
                 f"{steps * args.device_batch_size * seq_len * world_size:,}")

    samples, unconditioned, bpb, core = None, None, {}, None
    if "sample" in args.eval and rank == 0:
        samples, unconditioned = run_samples(model, tokenizer)
    if "bpb" in args.eval:
        bpb = evaluate_splits_bpb(model, tokenizer, device, args.device_batch_size, seq_len, steps)
    if "core" in args.eval:
        t0 = time.time()
        try:
            core = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, max_seq_len=seq_len,
                                 batch_tokens=args.batch_tokens)
        except EvalBundleError as err:
            if args.eval == ["core"]:
                raise
            # One of several evaluations: the others still count (offline runs have no eval bundle).
            log.warning("CORE skipped: %s", " ".join(str(err).split()))
    if core is not None and rank == 0:
        path = os.path.join(get_base_dir(), "base_eval", f"{slug}.csv")
        atomic_write(path, format_results_csv(core["results"], core["centered_results"], core["core_metric"]))
        log.info("Wrote %s", path)
        log.info("CORE metric: %.4f (%.1fs)", core["core_metric"], time.time() - t0)

    data = {"model": name, **({"CORE metric": core["core_metric"]} if core is not None else {}),
            **{f"{split} bpb": value for split, value in bpb.items()}, **(core["centered_results"] if core is not None else {}),
            **{f"sample {i}": text for i, text in enumerate(samples or [])},
            **{f"unconditioned {i}": text for i, text in enumerate(unconditioned or [])}}
    # Evaluating a mid/sft/rl checkpoint here must not overwrite the base model's report section.
    section = "Base model evaluation" if args.source == "base" else f"Base-style evaluation {args.source}"
    get_report().log(section=section, data=[data])
    return {"core": core, "bpb": bpb, "samples": samples, "unconditioned": unconditioned, "slug": slug}


if __name__ == "__main__":
    main()
