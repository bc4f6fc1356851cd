"""
Supervised finetuning: continue the midtrained model on the conversation mixture, training only on what
the assistant writes (completion-only loss), with a quick ChatCORE check as it goes.

One GPU / CPU:   python -m scripts.chat_sft
Many GPUs:       torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=sft
From base:       python -m scripts.chat_sft -i base          (skip midtraining)
Tiny CPU run:    python -m scripts.chat_sft --max-seq-len=512 --device-batch-size=8 --total-batch-size=4096 --num-iterations=100

Reads mid_checkpoints/<tag> (or base_checkpoints with -i base), writes chatsft_checkpoints/<tag> and the
report section "Chat SFT". Batch geometry and learning rates left unset are inherited from the source
checkpoint; its optimizer moments warm-start this one (--load-optimizer 0 to start fresh).
"""

import argparse

from nanochat.common import script_main, setup_default_logging
from nanochat.finetune import Stage, add_flags, run_stage
from tasks.mixtures import sft_mixture

STAGE = Stage(name="sft", title="Chat SFT", wandb_project="nanochat-sft", mask_mode="assistant",
              mixture=lambda split, args: sft_mixture(split, args.mmlu_epochs, args.gsm8k_epochs), sources=("mid", "base"), chatcore=True)
DEFAULTS = dict(max_seq_len=None, device_batch_size=None, total_batch_size=None, init_lr_frac=0.8,
                warmdown_ratio=0.5, eval_every=200, eval_tokens=40 * 524288)


def build_parser():
    p = argparse.ArgumentParser(description="SFT: the midtrained model on a conversation mixture, assistant tokens trained.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, STAGE, DEFAULTS)
    g = p.add_argument_group("SFT")
    g.add_argument("--load-optimizer", type=int, default=1, choices=[0, 1], help="warm-start the optimizer moments from the source checkpoint")
    g.add_argument("--mmlu-epochs", type=int, default=3, help="copies of MMLU auxiliary_train in the mixture")
    g.add_argument("--gsm8k-epochs", type=int, default=4, help="copies of GSM8K train in the mixture")
    g.add_argument("--chatcore-every", type=int, default=200, help="ChatCORE every N steps and at the end (-1 = never)")
    g.add_argument("--chatcore-max-cat", type=int, default=-1, help="problems per multiple-choice task (-1 = all)")
    g.add_argument("--chatcore-max-sample", type=int, default=24, help="problems per generative task (-1 = all)")
    return p


@script_main("chat_sft")
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    return run_stage(STAGE, args)


if __name__ == "__main__":
    main()
