# Shared by speedrun.sh, runrtx4070.sh and runcpu.sh (sourced, not run): environment setup, and stages that
# are skipped when already done, resumed when a run was killed half-way, and redone with FORCE=1.
#
#   source ./pipeline.sh
#   pipeline_setup "$@"                        # uv, the locked environment, base dir, log file, report
#   stage "Base model training" base-model-training.md base_checkpoints/d4 -- \
#       launch scripts.base_train --depth=4 --save-every=100
#   pipeline_finish "a question for the final model"
#
# Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat), WANDB_RUN (default dummy = no wandb),
# NPROC_PER_NODE (processes per node for torchrun; 1 = plain python), LOG_FILE (default
# $NANOCHAT_BASE_DIR/<script>.log), FORCE=1 (or --force) to redo stages that are done,
# UV_EXTRA (e.g. gpu) for `uv sync --extra`, TORCH_BACKEND (auto, cu126, ...) to swap the locked torch for the
# same version built for another CUDA (drivers older than the one PyPI's torch needs; README, GPU drivers).

# A stage header on a line of its own (the output before it may not end with a newline: triton, which
# torch's optimizers import, prints nanobind leak notes at exit without one).
banner() { printf '\n== %s\n' "$1"; }

pipeline_setup() {
    for arg in "$@"; do
        case "$arg" in
            --force) export FORCE=1 ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//' | sed '$d'; exit 0 ;;
            *) echo "unknown argument: $arg (use --force or --help)" >&2; exit 2 ;;
        esac
    done
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    export WANDB_RUN="${WANDB_RUN:-dummy}"
    export NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
    NPROC_NOTE="${NPROC_NOTE:-NPROC_PER_NODE=$NPROC_PER_NODE}"
    mkdir -p "$NANOCHAT_BASE_DIR"
    LOG_FILE="${LOG_FILE:-$NANOCHAT_BASE_DIR/$(basename "$0" .sh).log}"
    # Everything below also goes to the log file.
    exec > >(tee -a "$LOG_FILE") 2>&1
    banner "$(basename "$0") $(date -u '+%Y-%m-%d %H:%M:%S UTC'): base dir $NANOCHAT_BASE_DIR, log $LOG_FILE, $NPROC_NOTE"

    # uv from PyPI if missing, then exactly the locked dependencies (and our Rust tokenizer crate).
    if ! command -v uv >/dev/null 2>&1; then
        python3 -m pip install --quiet uv
        export PATH="$HOME/.local/bin:$PATH"
    fi
    uv sync --locked ${UV_EXTRA:+--extra "$UV_EXTRA"}
    # shellcheck disable=SC1091
    source .venv/bin/activate
    if [[ -n "${TORCH_BACKEND:-}" ]]; then
        # The lock holds PyPI's torch; this installs the same version from PyTorch's build for TORCH_BACKEND's CUDA
        # (auto: the newest one the installed driver runs). The stages run `python` from the venv, never `uv run`,
        # so nothing re-syncs it back; the next `uv sync` does, and this line swaps it again (from uv's cache).
        uv pip install --torch-backend="$TORCH_BACKEND" "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
    fi

    # A fresh run starts a fresh report; a re-run keeps the sections of the stages it will skip.
    if [[ -n "${FORCE:-}" ]] || ! ls "$NANOCHAT_BASE_DIR"/report/*.md 2>/dev/null | grep -qv header.md; then
        python -m nanochat.report reset
    fi
}

# gpu_processes: NPROC_PER_NODE defaults to one process per GPU that nvidia-smi lists (1 when it lists none);
# NPROC_NOTE says where the number came from, for the run's first log line. Call before pipeline_setup.
gpu_processes() {
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        NPROC_NOTE="NPROC_PER_NODE=$NPROC_PER_NODE (set by the caller)"
        return 0
    fi
    local gpus
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true)
    export NPROC_PER_NODE=$(( gpus > 0 ? gpus : 1 ))
    NPROC_NOTE="NPROC_PER_NODE=$NPROC_PER_NODE (default: one process per GPU; nvidia-smi lists ${gpus:-0})"
}

# require_gpu: stop here, in one line, unless torch can use this machine's NVIDIA GPU (a driver too old for
# torch's CUDA would otherwise send every stage to the CPU, where the run looks hung).
require_gpu() {
    python - "$(basename "$0")" <<'PY'
import sys
from nanochat.common import ConfigError, require_cuda
try:
    require_cuda(sys.argv[1])
except ConfigError as err:
    sys.exit(f"error: {err}")
PY
}

# launch MODULE ARGS...: run a stage on this node's processes (torchrun when NPROC_PER_NODE > 1).
launch() {
    local module=$1
    shift
    if [[ "$NPROC_PER_NODE" -gt 1 ]]; then
        torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m "$module" -- "$@"
    else
        python -m "$module" "$@"
    fi
}

# last_step DIR: the newest complete checkpoint step in DIR (a meta file marks a complete one), or nothing.
last_step() {
    local meta
    meta=$(ls "$1"/meta_*.json 2>/dev/null | sort | tail -n 1)
    [[ -n "$meta" ]] && basename "$meta" .json | sed 's/^meta_0*//; s/^$/0/'
}

# stage TITLE SECTION_FILE PRODUCT -- COMMAND...
#   PRODUCT (relative to the base dir) is what the stage leaves behind: a checkpoint directory, a file, or "-"
#   for an evaluation. The stage is done (skipped) when its report section exists and so does its product
#   (for a checkpoint directory: a complete checkpoint); the section is written last, so both mean it finished.
#   A training stage killed after a periodic checkpoint resumes from it (--resume-from-step); one killed before
#   any starts over. Checkpoints and sections are written atomically: a kill never leaves half a file.
stage() {
    local title=$1 section="$NANOCHAT_BASE_DIR/report/$2" product=$3
    shift 4  # title, section, product, --
    local path="$NANOCHAT_BASE_DIR/$product" resume=() made=""
    if [[ "$product" == "-" ]]; then
        made=yes
    elif [[ -d "$path" && -n "$(last_step "$path")" ]] || [[ -f "$path" ]]; then
        made=yes
    fi
    if [[ -n "${FORCE:-}" ]]; then
        [[ "$product" != "-" ]] && rm -rf "$path"
    elif [[ -f "$section" && -n "$made" ]]; then
        banner "$title: already done ($(basename "$section") and ${product/#-/its results} exist); FORCE=1 redoes it"
        return 0
    elif [[ "$product" != "-" && -d "$path" && -n "$(last_step "$path")" ]]; then
        resume=(--resume-from-step="$(last_step "$path")")
        banner "$title: resuming from step ${resume[0]#*=} of $path"
    fi
    banner "$title ($(date -u '+%H:%M:%S'))"
    "$@" "${resume[@]}"
}

# pipeline_finish [PROMPT]: write report.md, print its summary table and (with a prompt) one chat reply.
pipeline_finish() {
    python -m nanochat.report generate
    echo
    sed -n '/^## Summary/,$p' "$NANOCHAT_BASE_DIR/report/report.md"
    if [[ -n "${1:-}" ]]; then
        banner "A chat reply from the final model:"
        python -m scripts.chat_cli -i "${CHAT_SOURCE:-sft}" -p "$1"
    fi
    banner "done: $NANOCHAT_BASE_DIR/report/report.md (and ./report.md)"
}
