"""
Bits per byte of a base checkpoint on the train and val splits, plus greedy samples of the fixed prompts.

    python -m scripts.base_loss                                  # the largest base model, last step
    python -m scripts.base_loss -g d12 -s 5000 --split-tokens=1048576
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss

Writes the "Base model loss" section of the report.
"""

import argparse
import logging

from nanochat.checkpoint_manager import add_checkpoint_flags
from nanochat.common import (add_debug_flag, autodetect_device_type, compute_cleanup, compute_init, script_main,
                             setup_default_logging)
from nanochat.training import eval_steps_for

log = logging.getLogger("nanochat.base_loss")


def build_parser():
    p = argparse.ArgumentParser(description="Train/val bits per byte and samples of a base checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_flags(p, sources=())  # base checkpoints only
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per rank")
    p.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens evaluated per split (rounded down to whole steps)")
    add_debug_flag(p)
    return p


@script_main("base_loss")
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    from nanochat import checkpoint_manager
    from nanochat.engine import complete_prompts
    from nanochat.loss_eval import evaluate_splits_bpb
    from nanochat.report import get_report

    device_type = args.device_type or autodetect_device_type()
    _, rank, _, world_size, device = compute_init(device_type)
    try:
        model, tokenizer, meta = checkpoint_manager.load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
        seq_len = meta["model_config"]["sequence_len"]
        steps = eval_steps_for(args.split_tokens, args.device_batch_size, seq_len, world_size, flag="--split-tokens")
        bpb = evaluate_splits_bpb(model, tokenizer, device, args.device_batch_size, seq_len, steps)
        samples = complete_prompts(model, tokenizer) if rank == 0 else []
        for text in samples:
            log.info("sample: %s", text)
        data = {"model": f"base_model (step {meta['step']})", "train bpb": bpb["train"], "val bpb": bpb["val"]}
        data.update({f"sample {i}": text for i, text in enumerate(samples)})
        get_report().log(section="Base model loss", data=[data])
        return bpb, samples
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
