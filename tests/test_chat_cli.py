"""scripts/chat_cli.py on the micro chat model: the real script driven through a pipe, and main() in-process."""

import functools
import os
import subprocess
import sys

import pytest

from conftest import CHAT_CONTEXT
from nanochat.tokenizer import SPECIAL_TOKENS
from scripts import chat_cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def chat_env(chat_model_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(chat_model_dir))
    return dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def test_an_interactive_session_through_a_pipe(chat_env):
    # Each question is 54 tokens of the micro model's 128-token context, 32 of which are kept for the reply: by the
    # third question at the latest, the oldest turn has to go.
    questions = [f"question number {i}: " + "tell me about it " * 2 for i in range(3)]
    lines = [questions[0], "", "CLEAR", questions[0], questions[1], questions[2], "z" * 200, "quit", "never read"]
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", "--seed", "3", "-m", "32"],
                            input="\n".join(lines) + "\n", capture_output=True, text=True, env=chat_env, cwd=REPO_ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "NanoChat Interactive Mode" in out and "Type 'clear' to start a new conversation" in out
    assert out.count("Assistant: ") == 5 and "Conversation cleared." in out
    replies = [part.split("\nUser: ")[0] for part in out.split("Assistant: ")[1:]]
    dropped = f"oldest messages were dropped to fit the model's context of {CHAT_CONTEXT} tokens"
    assert dropped not in replies[0] + replies[1] and dropped in replies[2] + replies[3]
    assert f"That message is too long for this model's context of {CHAT_CONTEXT} tokens" in replies[4]
    assert out.rstrip().endswith("Goodbye!")
    assert not any(name in out for name in SPECIAL_TOKENS)  # special tokens are never printed by name
    assert "seed 3 (--seed 3 replays this)" in result.stderr


def test_one_prompt_prints_just_the_answer_and_is_never_a_command(chat_env, capsys):
    argv = ["--device-type", "cpu", "--seed", "5", "-m", "12", "-p", "clear"]
    assert chat_cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "Interactive" not in first and "Conversation cleared" not in first and first.endswith("\n")
    assert chat_cli.main(argv) == 0 and capsys.readouterr().out == first  # --seed replays it


def test_the_batch_thread_has_ended_when_main_returns(chat_env, monkeypatch):
    # runcpu.sh's last line once aborted at exit: the reply was done, but the batch thread was still in a torch op.
    import threading

    from nanochat.batching import BatchScheduler

    started = []
    monkeypatch.setattr(BatchScheduler, "_run", lambda self, run=BatchScheduler._run: (
        started.append(threading.current_thread()), run(self)))
    assert chat_cli.main(["--device-type", "cpu", "--seed", "5", "-m", "12", "-p", "hi"]) == 0
    assert len(started) == 1 and not started[0].is_alive()


def test_bad_flags_are_one_line_errors(chat_env):
    with pytest.raises(SystemExit) as exc:
        chat_cli.main(["--device-type", "cpu", "-t", "-1", "-m", "0"])
    assert exc.value.code == (
        "chat_cli: error: --temperature must be between 0.0 and 2.0, got -1.0; --max-tokens must be between 1 and 4096, got 0")


@pytest.mark.parametrize("seed", [str(2**64 - 1), str(2**64), str(2**63), "-2"])
def test_a_seed_out_of_range_is_refused_as_the_flags_are_parsed(seed, capsys):
    with pytest.raises(SystemExit) as exc:
        chat_cli.build_parser().parse_args(["--seed", seed])
    assert exc.value.code == 2
    assert f"argument --seed: must be between -1 (a random one) and {2**63 - 1}, got {seed}" in capsys.readouterr().err


def test_the_largest_seed_lasts_a_whole_session(chat_env, monkeypatch, capsys):
    lines = iter(["one", "two", "three", "quit"])
    monkeypatch.setattr(chat_cli, "chat_loop", functools.partial(chat_cli.chat_loop, read=lambda prompt: next(lines)))
    assert chat_cli.main(["--device-type", "cpu", "--seed", str(2**63 - 1), "-m", "4"]) == 0
    assert capsys.readouterr().out.count("Assistant: ") == 3  # reply i is sampled with seed + i
