"""
Midtraining: continue the base model on a mixture of conversations, training on every token, so that it
learns the chat format, multiple-choice answers, calculator tool use, spelling and who it is.

One GPU / CPU:   python -m scripts.mid_train
Many GPUs:       torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run=mid
Tiny CPU run:    python -m scripts.mid_train --max-seq-len=512 --device-batch-size=8 --total-batch-size=4096 --num-iterations=100

Reads base_checkpoints/<tag>, writes mid_checkpoints/<tag> and the report section "Midtraining".
"""

import argparse

from nanochat.common import script_main, setup_default_logging
from nanochat.finetune import Stage, add_flags, run_stage
from tasks.mixtures import midtraining_mixture

STAGE = Stage(name="mid", title="Midtraining", wandb_project="nanochat-mid", mask_mode="all",
              mixture=lambda split, args: midtraining_mixture(split), sources=("base",))
DEFAULTS = dict(max_seq_len=2048, device_batch_size="auto", total_batch_size=524288, init_lr_frac=1.0,
                warmdown_ratio=0.2, eval_every=150, eval_tokens=20 * 524288)


def build_parser():
    p = argparse.ArgumentParser(description="Midtraining: the base model on a conversation mixture, all tokens trained.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_flags(p, STAGE, DEFAULTS)


@script_main("mid_train")
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    return run_stage(STAGE, args)


if __name__ == "__main__":
    main()
