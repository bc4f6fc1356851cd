#!/usr/bin/env bash
# The reference run on one 8xH100 node: a d24 model with FP8, then midtraining, SFT and (optionally) RL.
#
# Upstream's recipe (its header says about 1.5 hours end to end for the latest version, without midtraining;
# their figure, not re-measured here): shards downloaded in the background while the tokenizer trains,
# base training at depth 24 on 8 data tokens per parameter with FP8 matmuls, the base evaluation (CORE,
# bpb, samples), then the chat stages and their evaluations, then the report.
#
#   bash speedrun.sh                       # one process per GPU that nvidia-smi lists
#   TORCH_BACKEND=auto bash speedrun.sh    # a driver older than 580: torch built for its CUDA (README)
#   WANDB_RUN=speedrun bash speedrun.sh    # log to wandb
#   WITH_RL=1 bash speedrun.sh             # also RL on GSM8K
#
# Environment: NANOCHAT_BASE_DIR, WANDB_RUN, NPROC_PER_NODE, LOG_FILE, FORCE, TORCH_BACKEND (see pipeline.sh).
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1  # 8 ranks on one node: no intra-op CPU threads fighting over the cores
export UV_EXTRA="${UV_EXTRA:-gpu}"
source ./pipeline.sh
gpu_processes  # NPROC_PER_NODE: one per GPU present (8 on the reference node) unless set
pipeline_setup "$@"
require_gpu

python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 170 &  # ~150 shards are needed for the d24 horizon; the rest is margin
DATA_PID=$!
stage "Tokenizer training" tokenizer-training.md tokenizer/tokenizer.pkl -- python -m scripts.tok_train
stage "Tokenizer evaluation" tokenizer-evaluation.md - -- python -m scripts.tok_eval
wait "$DATA_PID"

stage "Base model training" base-model-training.md base_checkpoints/d24 -- \
    launch scripts.base_train --depth=24 --target-param-data-ratio=8 --device-batch-size=16 --fp8 --save-every=1000 --run="$WANDB_RUN"
stage "Base model evaluation" base-model-evaluation.md - -- launch scripts.base_eval --device-batch-size=16
stage "Midtraining" midtraining.md mid_checkpoints/d24 -- launch scripts.mid_train --device-batch-size=16 --save-every=500 --run="$WANDB_RUN"
stage "Chat evaluation mid" chat-evaluation-mid.md - -- launch scripts.chat_eval -i mid
stage "Chat SFT" chat-sft.md chatsft_checkpoints/d24 -- launch scripts.chat_sft --save-every=500 --run="$WANDB_RUN"
stage "Chat evaluation sft" chat-evaluation-sft.md - -- launch scripts.chat_eval -i sft
if [[ -n "${WITH_RL:-}" ]]; then
    stage "Chat RL" chat-rl.md chatrl_checkpoints/d24 -- launch scripts.chat_rl --run="$WANDB_RUN"
    stage "Chat evaluation rl" chat-evaluation-rl.md - -- launch scripts.chat_eval -i rl -a GSM8K
fi

pipeline_finish "Why is the sky blue?"
