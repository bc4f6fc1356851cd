"""The mistakes users make get one line that names the problem and the fix, exit code 1, no traceback.

Each case runs a script's real entry point, `main(argv)` (what `python -m scripts.X` calls), and checks the
message; one case runs a script as a subprocess to check the exit status and that no traceback is printed
(and that --debug brings the traceback back).
"""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.tokenizer import compute_token_bytes
from scripts import base_eval, base_train, chat_eval

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device-type=cpu", "--depth=1", "--aspect-ratio=64", "--head-dim=32", "--max-seq-len=16", "--window-pattern=L",
        "--device-batch-size=2", "--total-batch-size=32", "--num-iterations=1", "--eval-every=-1", "--core-metric-every=-1",
        "--sample-every=-1"]


def _error(main, argv):
    """The one-line message a script exits with (SystemExit(str) means exit status 1 and that line on stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = exc.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


@pytest.fixture
def with_tokenizer(base_dir, byte_tokenizer):
    """The base dir with the byte-level tokenizer saved as tok_train would (no shards, no checkpoints)."""
    byte_tokenizer.save(str(base_dir / "tokenizer"))
    torch.save(compute_token_bytes(byte_tokenizer), base_dir / "tokenizer" / "token_bytes.pt")
    return base_dir


def _save_tiny_checkpoint(base_dir, tiny_gpt, source_dir, vocab_size=265, step=3):
    model = tiny_gpt(vocab_size=vocab_size, sequence_len=16)
    meta = {"step": step, "model_config": {k: getattr(model.config, k) for k in model.config.__dataclass_fields__}}
    checkpoint_dir = base_dir / source_dir / "d2"
    save_checkpoint(str(checkpoint_dir), step, model.state_dict(), None, meta)
    return checkpoint_dir


def test_no_tokenizer_says_to_run_tok_train(base_dir):
    assert "tok_train" in _error(base_train.main, TINY)


def test_chat_eval_blames_the_missing_tokenizer_not_the_checkpoint(base_dir, tiny_gpt):
    _save_tiny_checkpoint(base_dir, tiny_gpt, "chatsft_checkpoints")
    message = _error(chat_eval.main, ["-i", "sft", "-a", "ARC-Easy", "--device-type=cpu"])
    assert message.startswith("chat_eval: error: ") and "No tokenizer" in message and "tok_train" in message
    assert "checkpoint" not in message.lower().split("tokenizer.pkl")[1]


def test_no_shards_says_how_to_get_them(with_tokenizer):
    message = _error(base_train.main, TINY)
    assert "no pretraining shards" in message and "python -m nanochat.dataset" in message and "ingest" in message


def test_indivisible_total_batch_names_the_nearest_valid_values(with_tokenizer):
    message = _error(base_train.main, TINY + ["--total-batch-size=100"])
    assert "not divisible" in message and "--total-batch-size=96 or --total-batch-size=128" in message


def test_cuda_without_cuda(base_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    message = _error(base_train.main, TINY[1:] + ["--device-type=cuda"])
    assert "no CUDA device" in message and "--device-type cpu" in message


def test_resume_from_a_missing_step_lists_the_steps_that_exist(with_tokenizer, tiny_gpt):
    _save_tiny_checkpoint(with_tokenizer, tiny_gpt, "base_checkpoints", step=3)
    message = _error(base_train.main, TINY + ["--model-tag=d2", "--resume-from-step=5"])
    assert "no checkpoint for step 5" in message and "steps present: 3" in message


def test_bad_window_pattern_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        base_train.main(TINY + ["--window-pattern=SXL"])
    assert exc.value.code == 2
    assert "--window-pattern: must be a string of S and L" in capsys.readouterr().err


def test_bad_dtype_is_blamed_on_the_dtype(with_tokenizer, tiny_gpt, monkeypatch):
    from nanochat import common

    _save_tiny_checkpoint(with_tokenizer, tiny_gpt, "base_checkpoints")
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    common.get_compute_dtype.cache_clear()
    try:
        message = _error(base_eval.main, ["--eval", "sample", "--device-type=cpu"])
        assert "NANOCHAT_DTYPE='bf16' is not a supported dtype" in message and "bfloat16" in message
        assert "load" not in message and "checkpoint" not in message
    finally:
        common.get_compute_dtype.cache_clear()


def test_corrupt_checkpoint_says_which_file(with_tokenizer, tiny_gpt):
    checkpoint_dir = _save_tiny_checkpoint(with_tokenizer, tiny_gpt, "base_checkpoints")
    (checkpoint_dir / "model_000003.pt").write_bytes(b"not a checkpoint")
    message = _error(base_eval.main, ["--eval", "sample", "--device-type=cpu"])
    assert "model_000003.pt is corrupt or truncated" in message


def test_checkpoint_for_another_vocab_names_both_sizes(with_tokenizer, tiny_gpt):
    _save_tiny_checkpoint(with_tokenizer, tiny_gpt, "base_checkpoints", vocab_size=300)
    message = _error(base_eval.main, ["--eval", "sample", "--device-type=cpu"])
    assert "the tokenizer has 265 tokens" in message and "trained with 300" in message


def test_task_data_unavailable_offline_says_how_to_export_it(with_tokenizer, tiny_gpt, monkeypatch, tmp_path):
    import datasets

    _save_tiny_checkpoint(with_tokenizer, tiny_gpt, "chatsft_checkpoints")
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path / "no_tasks_here"))

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = _error(chat_eval.main, ["-i", "sft", "-a", "ARC-Easy", "--device-type=cpu"])
    assert "allenai/ai2_arc" in message and "python -m tasks.common --only allenai/ai2_arc" in message


def test_the_real_command_line_prints_one_line_and_no_traceback(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONPATH=REPO_ROOT)
    env.pop("NANOCHAT_DEBUG", None)
    cmd = [sys.executable, "-m", "scripts.base_train", *TINY]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert quiet.returncode == 1
    assert "Traceback" not in quiet.stderr
    last = [line for line in quiet.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("base_train: error: ") and "tok_train" in last
    loud = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "TokenizerNotFoundError" in loud.stderr
