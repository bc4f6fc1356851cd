#!/usr/bin/env bash
# The whole nanochat pipeline at toy scale on a CPU, offline if need be (about 25 minutes on 2 cores).
#
# Every stage the GPU runs have: data, tokenizer, base model pretraining and evaluation, midtraining, SFT and
# RL, each chat stage followed by its evaluation, then the report. Without network access the pretraining
# shards are built from an offline corpus of real text that ships with Python, and the chat data falls back
# to what needs no download (identity conversations shipped in the repo, spelling tasks over an offline word
# list, synthetic arithmetic problems instead of GSM8K); the log and the report say what was used.
#
#   bash runcpu.sh            # re-running skips the stages that are done and resumes an interrupted one
#   bash runcpu.sh --force    # start over (also FORCE=1)
#
# Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat), WANDB_RUN, NPROC_PER_NODE, LOG_FILE (see pipeline.sh).
set -euo pipefail
cd "$(dirname "$0")"
source ./pipeline.sh
pipeline_setup "$@"

# Data: a few pretraining shards, or the offline corpus when the dataset host can't be reached.
python -m nanochat.dataset -n 4 --offline-fallback

stage "Tokenizer training" tokenizer-training.md tokenizer/tokenizer.pkl -- \
    python -m scripts.tok_train --max-chars=20000000 --vocab-size=8192
stage "Tokenizer evaluation" tokenizer-evaluation.md - -- python -m scripts.tok_eval --timeout=5

# Pretraining: a 4-layer model (d=256) on 200 x 4,096 tokens, with full attention (no sliding-window kernel on CPU).
stage "Base model training" base-model-training.md base_checkpoints/d4 -- \
    launch scripts.base_train --depth=4 --head-dim=64 --window-pattern=L --max-seq-len=512 --device-batch-size=8 \
    --total-batch-size=4096 --num-iterations=200 --warmup-steps=10 --eval-every=100 --eval-tokens=65536 \
    --core-metric-every=-1 --sample-every=200 --save-every=100 --run="$WANDB_RUN"
# bpb on both splits and samples; CORE too when its eval bundle can be downloaded (skipped, with a line, offline).
stage "Base model evaluation" base-model-evaluation.md - -- \
    launch scripts.base_eval --eval=sample,bpb,core --device-batch-size=8 --split-tokens=65536 --max-per-task=16

# Midtraining, SFT and RL on the conversation mixtures (rows of 512 tokens, 4,096 tokens per step).
CHAT_ROWS=(--max-seq-len=512 --device-batch-size=8 --total-batch-size=4096)
stage "Midtraining" midtraining.md mid_checkpoints/d4 -- \
    launch scripts.mid_train "${CHAT_ROWS[@]}" --num-iterations=100 --eval-every=50 --eval-tokens=32768 --save-every=50 --run="$WANDB_RUN"
stage "Chat evaluation mid" chat-evaluation-mid.md - -- launch scripts.chat_eval -i mid -x 24
stage "Chat SFT" chat-sft.md chatsft_checkpoints/d4 -- \
    launch scripts.chat_sft --num-iterations=100 --eval-every=50 --eval-tokens=32768 --chatcore-every=-1 --save-every=50 --run="$WANDB_RUN"
stage "Chat evaluation sft" chat-evaluation-sft.md - -- launch scripts.chat_eval -i sft -x 24
stage "Chat RL" chat-rl.md chatrl_checkpoints/d4 -- \
    launch scripts.chat_rl --num-iterations=10 --examples-per-step=4 --num-samples=8 --device-batch-size=8 \
    --max-new-tokens=96 --eval-every=5 --eval-examples=16 --save-every=5 --run="$WANDB_RUN"
stage "Chat evaluation rl" chat-evaluation-rl.md - -- launch scripts.chat_eval -i rl -x 24

CHAT_SOURCE=rl pipeline_finish "Kenji reads 6 pages every day. How many pages does he read in 1 week?"
