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

python -m nanochat.report generate
