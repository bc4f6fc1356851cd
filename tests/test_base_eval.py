"""scripts/base_eval.py: flags, the CSV and report section it writes, the sample and bpb modes, and its
one-line errors. The checkpoint loader, engine and data loader are replaced by small fakes so the
script is tested on its own; the CORE fixture bundle and fake model come from tests/core_bundle.py."""

import logging
import sys
import types

import pytest
import torch

from nanochat.checkpoint_manager import CheckpointMismatchError, CheckpointNotFoundError
from nanochat.core_eval import format_results_csv
from scripts import base_eval

from core_bundle import EXPECTED_ACC, EXPECTED_CENTERED, FakeLM, write_bundle
from dist_harness import free_port

STEP = 1234


@pytest.fixture
def base(base_dir, monkeypatch):
    """The kit's NANOCHAT_BASE_DIR, created, with no bundle URL override and no torchrun environment."""
    base_dir.mkdir()
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE_URL", raising=False)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return base_dir


@pytest.fixture
def loaded(monkeypatch, byte_tokenizer):
    """Install a fake nanochat.checkpoint_manager; returns the list of load_model calls."""
    calls = []
    module = types.ModuleType("nanochat.checkpoint_manager")

    def load_model(source, device, phase, model_tag=None, step=None):
        calls.append(dict(source=source, device=str(device), phase=phase, model_tag=model_tag, step=step))
        return FakeLM(context=256), byte_tokenizer, {"step": STEP, "model_config": {"sequence_len": 256}}

    module.load_model = load_model
    monkeypatch.setitem(sys.modules, "nanochat.checkpoint_manager", module)
    monkeypatch.setattr("nanochat.checkpoint_manager", module, raising=False)  # `from nanochat import checkpoint_manager`
    return calls


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_help_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        base_eval.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--eval", "--source", "--model-tag", "--step", "--max-per-task", "--device-batch-size", "--split-tokens", "--device-type"):
        assert flag in out
    args = base_eval.build_parser().parse_args([])
    assert args.eval == ["core", "bpb", "sample"] and args.split_tokens == 20971520 and args.device_batch_size == 32
    assert args.max_per_task == -1 and args.source == "base" and args.step is None


def test_unknown_eval_mode_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        base_eval.main(["--eval", "core,loss"])
    assert e.value.code == 2
    assert "loss" in capsys.readouterr().err


def test_core_mode_writes_csv_and_report(base, loaded):
    write_bundle(str(base))  # pre-placed bundle: no download
    out = base_eval.main(["--eval", "core", "--device-type", "cpu", "-g", "d4", "-s", str(STEP)])
    assert loaded == [dict(source="base", device="cpu", phase="eval", model_tag="d4", step=STEP)]
    core = sum(EXPECTED_CENTERED.values()) / len(EXPECTED_CENTERED)
    assert out["core"]["core_metric"] == pytest.approx(core, abs=1e-6)
    csv_text = read(base / "base_eval" / f"base_model_d4_{STEP:06d}.csv")
    assert csv_text == format_results_csv(EXPECTED_ACC, EXPECTED_CENTERED, core)
    section = read(base / "report" / "base-model-evaluation.md")
    assert section.startswith("## Base model evaluation\ntimestamp: ")
    assert f"- model: base_model (step {STEP})\n" in section
    assert f"- CORE metric: {core:.4f}\n" in section
    for label, value in EXPECTED_CENTERED.items():
        assert f"- {label}: {value:.4f}\n" in section
    assert "bpb" not in section and "sample" not in section
    base_eval.main(["--eval", "core", "--device-type", "cpu", "-i", "sft", "--max-per-task", "2"])
    assert read(base / "report" / "base-model-evaluation.md") == section  # another source gets its own section
    assert "- model: sft_model (step 1234)" in read(base / "report" / "base-style-evaluation-sft.md")


def test_max_per_task_and_default_slug(base, loaded):
    write_bundle(str(base))
    out = base_eval.main(["--eval", "core", "--device-type", "cpu", "--max-per-task", "3", "--batch-tokens", "0"])
    assert loaded[0]["model_tag"] is None and loaded[0]["step"] is None
    assert (base / "base_eval" / f"base_model_{STEP:06d}.csv").exists()
    assert out["core"]["results"] != pytest.approx(EXPECTED_ACC)  # only 3 examples per task were scored


def test_unreachable_bundle_is_a_one_line_exit(base, loaded, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/eval_bundle.zip"
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url)
    with pytest.raises(SystemExit) as e:
        base_eval.main(["--eval", "core", "--device-type", "cpu"])
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message  # sys.exit(str) prints it alone, no traceback
    assert message.startswith("base_eval: error: eval bundle unavailable") and url in message


@pytest.mark.parametrize("error, expected", [
    (CheckpointNotFoundError("no checkpoints in /x/base_checkpoints; run base_train first"),
     "base_eval: error: no checkpoints in /x/base_checkpoints; run base_train first"),
    (CheckpointMismatchError("the tokenizer has 265 tokens but checkpoint\n/x was trained with 32768"),
     "base_eval: error: the tokenizer has 265 tokens but checkpoint /x was trained with 32768"),
])
def test_unloadable_checkpoint_is_a_clear_exit(base, monkeypatch, error, expected):
    module = types.ModuleType("nanochat.checkpoint_manager")

    def load_model(*args, **kwargs):
        raise error

    module.load_model = load_model
    monkeypatch.setitem(sys.modules, "nanochat.checkpoint_manager", module)
    monkeypatch.setattr("nanochat.checkpoint_manager", module, raising=False)
    with pytest.raises(SystemExit) as e:
        base_eval.main(["--eval", "core", "--device-type", "cpu"])
    assert expected in e.value.code and "\n" not in e.value.code


def test_sample_mode_logs_samples(base, loaded, monkeypatch):
    calls = []

    class Engine:
        def __init__(self, model, tokenizer):
            self.tokenizer = tokenizer

        def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, **kwargs):
            calls.append((len(tokens), num_samples, max_tokens, temperature))
            rows = [list(tokens) + self.tokenizer.encode(f" gen{i}") for i in range(num_samples)]
            return rows, [[0] * len(r) for r in rows]

    import nanochat.engine

    monkeypatch.setattr(nanochat.engine, "Engine", Engine)
    out = base_eval.main(["--eval", "sample", "--device-type", "cpu"])
    assert out["samples"][0] == "<|bos|>The capital of France is gen0"
    assert len(out["samples"]) == 7 and len(out["unconditioned"]) == 8
    assert calls[-1] == (1, 8, 128, 1.0) and all(c[1:] == (1, 16, 0) for c in calls[:-1])
    section = read(base / "report" / "base-model-evaluation.md")
    assert "- sample 6: <|bos|>If 5*x + 3 = 13, then x is gen0\n" in section
    assert "- unconditioned 7: <|bos|> gen7\n" in section


def test_bpb_mode_rounds_split_tokens_and_reports_both_splits(base, loaded, monkeypatch, caplog):
    seen = []

    def loader(tokenizer, B, T, split, device):
        seen.append((B, T, split))
        return iter([split])

    def evaluate_bpb(model, batches, steps, token_bytes):
        split = next(batches)
        seen.append(steps)
        return {"train": 0.9, "val": 1.1}[split]

    monkeypatch.setattr("nanochat.dataloader.tokenizing_distributed_data_loader_bos_bestfit", loader)
    monkeypatch.setattr("nanochat.loss_eval.evaluate_bpb", evaluate_bpb)
    monkeypatch.setattr("nanochat.tokenizer.get_token_bytes", lambda device: torch.ones(265, dtype=torch.int32))
    with caplog.at_level(logging.INFO):
        out = base_eval.main(["--eval", "bpb", "--device-type", "cpu", "--device-batch-size", "2", "--split-tokens", "2000"])
    # 2 rows x 256 tokens (the checkpoint's sequence_len) = 512 tokens per step: 3 steps, 1536 tokens
    assert seen == [(2, 256, "train"), 3, (2, 256, "val"), 3]
    assert "bpb: 3 batches per split = 1,536 tokens" in caplog.text
    assert out["bpb"] == {"train": 0.9, "val": 1.1}
    section = read(base / "report" / "base-model-evaluation.md")
    assert "- train bpb: 0.9000\n- val bpb: 1.1000\n" in section


def test_split_tokens_below_one_step_is_a_clear_error(base, loaded):
    from nanochat.training import eval_steps_for

    assert eval_steps_for(1024, 2, 256, 2) == 1 and eval_steps_for(2047, 2, 256, 2) == 1
    with pytest.raises(SystemExit) as e:
        base_eval.main(["--eval", "bpb", "--device-type", "cpu", "--split-tokens", "100"])
    assert "--split-tokens 100 is less than one batch" in e.value.code


def test_end_to_end_with_a_real_tiny_checkpoint(base, byte_tokenizer, tiny_gpt):
    """The real checkpoint loader, GPT and tokenizer: the script's CORE equals evaluate_core on the same model."""
    from dataclasses import asdict

    from nanochat.checkpoint_manager import load_model, save_checkpoint
    from nanochat.core_eval import evaluate_core

    byte_tokenizer.save(str(base / "tokenizer"))
    # compute_dtype=None: the dtype a training script would build it in on this machine.
    model = tiny_gpt(sequence_len=128, n_layer=1, n_head=1, n_kv_head=1, compute_dtype=None)
    save_checkpoint(str(base / "base_checkpoints" / "d1"), 7, model.state_dict(), None,
                    {"step": 7, "model_config": asdict(model.config)})
    write_bundle(str(base))
    out = base_eval.main(["--eval", "core", "--device-type", "cpu", "--max-per-task", "4"])
    assert out["slug"] == "base_model_000007"
    loaded, tok, _ = load_model("base", "cpu", phase="eval")
    direct = evaluate_core(loaded, tok, "cpu", max_per_task=4, max_seq_len=128)
    assert out["core"]["results"] == direct["results"]
    csv_lines = (base / "base_eval" / "base_model_000007.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(EXPECTED_ACC) + 1 and csv_lines[-1].startswith("CORE")
