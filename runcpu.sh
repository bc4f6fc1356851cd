#!/usr/bin/env bash
# The whole nanochat pipeline at toy scale on a laptop / CPU box (a few minutes on 2 cores).
# It exercises every stage the GPU run does: data -> tokenizer -> pretraining -> evaluation -> report.
# Run from the repo root:  bash runcpu.sh
set -euo pipefail
cd "$(dirname "$0")"

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export WANDB_RUN="${WANDB_RUN:-dummy}"
mkdir -p "$NANOCHAT_BASE_DIR"

# Environment: uv (from PyPI if missing), then the locked dependencies and our Rust tokenizer crate.
if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet uv
fi
uv sync --locked
source .venv/bin/activate

python -m nanochat.report reset

# Data: a few pretraining shards. Without network access this falls back to the offline corpus
# (real text that ships with Python), and says so.
python -m nanochat.dataset -n 4 --offline-fallback

# Tokenizer: train on the shards, then compare its compression with GPT-2/GPT-4 where available.
python -m scripts.tok_train --max-chars=20000000 --vocab-size=8192
python -m scripts.tok_eval

# Pretraining: a 4-layer model for a few hundred steps (minutes on a laptop), checkpoint at the end.
python -m scripts.base_train --depth=4 --max-seq-len=512 --window-pattern=L --device-batch-size=8 \
    --total-batch-size=4096 --num-iterations=300 --eval-every=100 --eval-tokens=65536 \
    --core-metric-every=-1 --sample-every=300 --warmup-steps=10 --run="$WANDB_RUN"
python -m scripts.base_loss --device-batch-size=8 --split-tokens=65536

# CORE needs the eval bundle; without network access base_eval says so in one line and the run goes on.
python -m scripts.base_eval --eval core --max-per-task=16 || echo "CORE evaluation skipped (see the line above)"

python -m nanochat.report generate
