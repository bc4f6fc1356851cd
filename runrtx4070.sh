#!/usr/bin/env bash
# The pipeline on one 12 GB consumer GPU (an RTX 4070 or alike): a d12 model, hours rather than days.
#
# d12 (768 wide, 286M parameters with the value embeddings), vocabulary 32,768, rows of 2,048 tokens, device
# batch 8 with gradient accumulation to 65,536 tokens per step, full attention (window pattern L: no FA3 on
# consumer cards, and SDPA has no sliding-window kernel), bf16, no FP8. Every stage fits in 12 GB; the device
# batch probe (--device-batch-size auto) is the safety net on smaller cards. Upstream users measured about
# 55.7k tok/s and 9.4 GB peak for base training on an RTX 4070 (their figures, not re-measured here).
#
#   bash runrtx4070.sh            # re-running skips finished stages and resumes an interrupted one
#   bash runrtx4070.sh --force    # start over (also FORCE=1)
#
# Environment: NANOCHAT_BASE_DIR, WANDB_RUN, NPROC_PER_NODE (default 1), LOG_FILE, TORCH_BACKEND (see pipeline.sh).
set -euo pipefail
cd "$(dirname "$0")"
export UV_EXTRA="${UV_EXTRA:-gpu}"
source ./pipeline.sh
pipeline_setup "$@"
require_gpu

# Data: 8 shards now for the tokenizer, the rest in the background while it trains.
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 40 &
DATA_PID=$!
stage "Tokenizer training" tokenizer-training.md tokenizer/tokenizer.pkl -- python -m scripts.tok_train --vocab-size=32768
stage "Tokenizer evaluation" tokenizer-evaluation.md - -- python -m scripts.tok_eval
wait "$DATA_PID"

ROWS=(--max-seq-len=2048 --device-batch-size=8 --total-batch-size=65536)
stage "Base model training" base-model-training.md base_checkpoints/d12 -- \
    launch scripts.base_train --depth=12 --window-pattern=L "${ROWS[@]}" --save-every=1000 --run="$WANDB_RUN"
stage "Base model evaluation" base-model-evaluation.md - -- launch scripts.base_eval --device-batch-size=8
stage "Midtraining" midtraining.md mid_checkpoints/d12 -- \
    launch scripts.mid_train "${ROWS[@]}" --save-every=500 --run="$WANDB_RUN"
stage "Chat evaluation mid" chat-evaluation-mid.md - -- launch scripts.chat_eval -i mid
stage "Chat SFT" chat-sft.md chatsft_checkpoints/d12 -- launch scripts.chat_sft --save-every=500 --run="$WANDB_RUN"
stage "Chat evaluation sft" chat-evaluation-sft.md - -- launch scripts.chat_eval -i sft
if [[ -n "${WITH_RL:-}" ]]; then  # optional, as upstream: WITH_RL=1 bash runrtx4070.sh
    stage "Chat RL" chat-rl.md chatrl_checkpoints/d12 -- launch scripts.chat_rl --device-batch-size=8 --run="$WANDB_RUN"
    stage "Chat evaluation rl" chat-evaluation-rl.md - -- launch scripts.chat_eval -i rl -a GSM8K
fi

pipeline_finish "Why is the sky blue?"
