"""The whole pipeline through the public scripts with a micro model (the CI smoke test), and the run scripts:
their stage helper (skip / resume / force) and every flag the GPU recipes pass."""

import os
import random
import re
import shlex
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core_bundle import write_bundle

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a river stone market winter garden signal copper lantern orbit meadow thunder violet harbor pencil canyon "
         "ember falcon quartz velvet wander glacier saddle timber hollow breeze runs sleeps under over near bright").split()
SECTIONS = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss", "Base model evaluation",
            "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl", "Summary"]


@pytest.fixture
def offline(base_dir, tmp_path, monkeypatch, offline_tasks):
    """Fixture shards, a word list and a CORE bundle in the base dir; no hub datasets (as offline)."""
    data = base_dir / "base_data_climbmix"
    data.mkdir(parents=True)
    rng = random.Random(0)
    for index in range(3):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "." for _ in range(300)]
        pq.write_table(pa.table({"text": docs}), data / f"shard_{index:05d}.parquet", row_group_size=50)
    (base_dir / "words_alpha.txt").write_text("\n".join(WORDS) + "\n")
    write_bundle(str(base_dir))
    monkeypatch.chdir(tmp_path)
    return base_dir


def test_every_stage_through_the_public_scripts_writes_the_whole_report(offline):
    from nanochat import report
    from scripts import base_eval, base_loss, base_train, chat_eval, chat_rl, chat_sft, mid_train, tok_eval, tok_train

    cpu = ["--device-type=cpu"]
    rows = ["--max-seq-len=32", "--device-batch-size=4", "--total-batch-size=128"]
    report.main(["reset"])
    tok_train.main(["--vocab-size=300", "--max-chars=100000"])
    tok_eval.main(["--offline"])
    base_train.main(cpu + rows + ["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--window-pattern=L", "--num-iterations=4",
                                  "--eval-every=4", "--eval-tokens=128", "--core-metric-every=-1", "--sample-every=-1"])
    base_loss.main(cpu + ["--device-batch-size=4", "--split-tokens=128"])
    base_eval.main(cpu + ["--eval=core", "--max-per-task=4"])
    finetune = cpu + ["--num-iterations=2", "--eval-every=-1", "--eval-tokens=128"]
    mid_train.main(finetune + rows)
    chat = cpu + ["-x", "2", "-m", "8"]
    chat_eval.main(chat + ["-i", "mid"])
    chat_sft.main(finetune + ["--chatcore-every=-1"])
    chat_eval.main(chat + ["-i", "sft"])
    chat_rl.main(cpu + ["--num-iterations=1", "--examples-per-step=1", "--num-samples=2", "--device-batch-size=2",
                        "--max-new-tokens=8", "--eval-every=-1"])
    chat_eval.main(chat + ["-i", "rl"])
    report.main(["generate"])

    text = (offline / "report" / "report.md").read_text()
    positions = [text.find(f"## {title}") for title in SECTIONS]
    assert -1 not in positions, [t for t, p in zip(SECTIONS, positions) if p == -1]
    assert positions == sorted(positions)
    summary = text[positions[-1]:]
    header = next(line for line in summary.splitlines() if line.startswith("|") and "BASE" in line)
    assert [c.strip() for c in header.strip("|").split("|")][-4:] == ["BASE", "MID", "SFT", "RL"]
    core = next(line for line in summary.splitlines() if line.startswith("| CORE"))
    assert re.search(r"\d\.\d{4}", core), core
    spelling = next(line for line in summary.splitlines() if line.startswith("| SpellingBee"))
    assert len(re.findall(r"\d\.\d{4}", spelling)) == 3, spelling  # MID, SFT and RL evaluated it
    assert (offline / "report" / "chat-rl.md").exists() and os.path.exists("report.md")


# -----------------------------------------------------------------------------
# The run scripts


def _bash(script, tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), FORCE="")
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {REPO_ROOT}/pipeline.sh; {script}"],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)


def test_stage_skips_finished_work_resumes_killed_work_and_redoes_with_force(tmp_path):
    (tmp_path / "report").mkdir()
    record = tmp_path / "calls.txt"
    fake = f"echo \"$*\" >> {record}"
    # Not started: the command runs with no resume flag.
    run = _bash(f"stage Base base.md base_checkpoints/d4 -- bash -c '{fake}' x --depth=4", tmp_path)
    assert run.returncode == 0, run.stderr
    # Killed after the step-100 checkpoint: resumed from it.
    ckpt = tmp_path / "base_checkpoints" / "d4"
    ckpt.mkdir(parents=True)
    for step in (50, 100):
        (ckpt / f"meta_{step:06d}.json").write_text("{}")
    run = _bash(f"stage Base base.md base_checkpoints/d4 -- bash -c '{fake}' x --depth=4", tmp_path)
    assert "resuming from step 100" in run.stdout
    # Finished (section written): skipped; an evaluation stage likewise once its section exists.
    (tmp_path / "report" / "base.md").write_text("## Base\n")
    (tmp_path / "report" / "eval.md").write_text("## Eval\n")
    run = _bash(f"stage Base base.md base_checkpoints/d4 -- bash -c '{fake}' x; stage Eval eval.md - -- bash -c '{fake}' x", tmp_path)
    assert run.stdout.count("already done") == 2
    # FORCE=1 redoes a finished stage from scratch (its checkpoints go first).
    run = _bash(f"FORCE=1 stage Base base.md base_checkpoints/d4 -- bash -c '{fake}' x --fresh", tmp_path)
    assert run.returncode == 0 and not ckpt.exists()
    assert record.read_text().splitlines() == ["--depth=4", "--depth=4 --resume-from-step=100", "--fresh"]


def _launches(script):
    """(module, args) of every `launch scripts.X ...` and `python -m scripts.X ...` in a run script, with its
    bash arrays and variables expanded the way the script sets them."""
    text = open(os.path.join(REPO_ROOT, script)).read().replace("\\\n", " ")
    arrays = {name: shlex.split(body) for name, body in re.findall(r"^(\w+)=\((.*)\)$", text, re.M)}
    calls = []
    for line in text.splitlines():
        m = re.search(r"(?:launch|python -m) (scripts\.\w+)(.*)$", line)
        if not m:
            continue
        args = []
        for word in shlex.split(m.group(2)):
            if (a := re.fullmatch(r'\$\{(\w+)\[@\]\}', word)) and a.group(1) in arrays:
                args += arrays[a.group(1)]
            else:
                args.append(word.replace("$WANDB_RUN", "dummy"))
        calls.append((m.group(1), args))
    return calls


@pytest.mark.parametrize("script", ["speedrun.sh", "runrtx4070.sh", "runcpu.sh"])
def test_run_scripts_parse_and_every_stage_accepts_its_flags(script):
    import importlib

    assert subprocess.run(["bash", "-n", os.path.join(REPO_ROOT, script)]).returncode == 0
    calls = _launches(script)
    modules = {m for m, _ in calls}
    assert {"scripts.tok_train", "scripts.base_train", "scripts.mid_train", "scripts.chat_sft", "scripts.chat_eval"} <= modules
    for module, args in calls:
        importlib.import_module(module).build_parser().parse_args(args)  # argparse exits on an unknown flag or bad value
