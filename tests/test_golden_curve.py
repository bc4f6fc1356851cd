"""Golden curves: scripts/base_train on fixed fixture data, seed and settings (one thread, fp32, eager) must
reproduce the per-step training losses and val bpb stored in tests/golden/. A change of learning rate, init,
loss or data loader moves the curve far past the tolerance; a refactoring that changes no number keeps it.

After a deliberate change, regenerate the files and commit them with a message that says why:

    NANOCHAT_UPDATE_GOLDEN=1 uv run pytest tests/test_golden_curve.py -m "slow or not slow"

The slow test is the scale of the upstream comparison in docs/performance.md (d4, 512-token rows, 4,096-token
batches, 300 steps) on the same generated fixture text, not on CPython's sources, which differ between Pythons.
"""

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import training
from nanochat.common import atomic_write
from nanochat.tokenizer import compute_token_bytes
from scripts import base_train

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
UPDATE = os.environ.get("NANOCHAT_UPDATE_GOLDEN") == "1"
# Same-machine reruns are bit-identical; another CPU's matmul kernels round differently, and a few dozen steps
# of training amplify that to ~1e-5. The one-line perturbations in docs/performance.md move the curve by >= 1e-3.
RTOL = 2e-4

NOUNS = "river stone market winter garden signal copper lantern orbit meadow harbor pencil canyon falcon glacier".split()
VERBS = "runs sleeps waits sings turns falls grows shines".split()
ADJS = "bright cold quiet old small green".split()


def _sentence(rng):
    # A tiny grammar: the next word depends on the one before, so there is something to learn beyond unigrams.
    return f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} near the {rng.choice(NOUNS)}."


def _document(rng):
    # Lengths spread from a few to a few hundred bytes, so the best-fit packer both fits and crops.
    return " ".join(_sentence(rng) for _ in range(rng.randint(1, 12)))


def _fixture_base(base, byte_tokenizer, shards, docs_per_shard):
    """A base dir with `shards` parquet shards of generated text (the last one val) and the byte tokenizer."""
    data_dir = base / "base_data_climbmix"
    data_dir.mkdir(parents=True)
    for index in range(shards):
        rng = random.Random(index)
        texts = [_document(rng) for _ in range(docs_per_shard)]
        pq.write_table(pa.table({"text": texts}), data_dir / f"shard_{index:05d}.parquet", row_group_size=200)
    byte_tokenizer.save(str(base / "tokenizer"))
    torch.save(compute_token_bytes(byte_tokenizer), base / "tokenizer" / "token_bytes.pt")


def _train(base, monkeypatch, argv):
    """Run base_train on one thread (the thread count changes how matmuls split their sums); return its curve."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    real = training.configure_cpu_threads
    monkeypatch.setattr(training, "configure_cpu_threads", lambda num_threads=None: real(1))
    threads = torch.get_num_threads()
    try:
        base_train.main(["--device-type=cpu", "--compile=off", "--seed=42", *argv])
    finally:
        torch.set_num_threads(threads)
    with open(base / "report" / "curves" / "base.json", encoding="utf-8") as f:
        curve = json.load(f)
    return {"argv": argv, "train_loss": curve["train_loss"], "val_bpb": curve["val_bpb"]}


def _check_against_golden(name, got):
    path = os.path.join(GOLDEN_DIR, name)
    if UPDATE:
        atomic_write(path, json.dumps(got, indent=1) + "\n")
        pytest.skip(f"wrote {path}: commit it with a message that says why the curve changed")
    with open(path, encoding="utf-8") as f:
        want = json.load(f)
    assert got["argv"] == want["argv"], "the run's flags changed: regenerate the golden file (see the module docstring)"
    for key in ("train_loss", "val_bpb"):
        steps = [s for s, _ in want[key]]
        assert [s for s, _ in got[key]] == steps, f"{key}: logged at other steps than the golden run"
        for (step, value), (_, expected) in zip(got[key], want[key]):
            assert value == pytest.approx(expected, rel=RTOL), (
                f"{key} at step {step} is {value:.6f}, the golden curve has {expected:.6f} (rtol {RTOL}); if the change "
                "is deliberate, regenerate with NANOCHAT_UPDATE_GOLDEN=1 (see tests/test_golden_curve.py)")


# 2 layers, 64 wide, rows of 64 bytes, 2 micro-batches of 4 rows per step, 40 steps, val bpb at 0, 20 and 40.
# LRs well above the depth-derived ones so that 40 steps of 512 tokens move every parameter group.
TINY = ["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64", "--window-pattern=L",
        "--device-batch-size=4", "--total-batch-size=512", "--num-iterations=40", "--warmup-steps=4",
        "--eval-every=20", "--eval-tokens=2048", "--core-metric-every=-1", "--sample-every=-1",
        "--matrix-lr=0.3", "--embedding-lr=3", "--unembedding-lr=0.1", "--scalar-lr=1"]


def test_tiny_run_follows_the_golden_curve(tmp_path, monkeypatch, byte_tokenizer):
    _fixture_base(tmp_path / "base", byte_tokenizer, shards=3, docs_per_shard=600)
    monkeypatch.chdir(tmp_path)
    _check_against_golden("base_train_tiny.json", _train(tmp_path / "base", monkeypatch, TINY))


# The table's scale: d4 (256 wide, 64-dim heads), 512-token rows, 4,096-token steps, 300 steps, val bpb every 100.
TABLE = ["--depth=4", "--head-dim=64", "--window-pattern=L", "--max-seq-len=512", "--device-batch-size=8",
         "--total-batch-size=4096", "--num-iterations=300", "--eval-every=100", "--eval-tokens=65536",
         "--core-metric-every=-1", "--sample-every=-1", "--warmup-steps=10"]


@pytest.mark.slow
def test_table_scale_run_follows_the_golden_curve(tmp_path, monkeypatch, byte_tokenizer):
    _fixture_base(tmp_path / "base", byte_tokenizer, shards=4, docs_per_shard=2500)  # ~1.6M train bytes > 1.2M used
    monkeypatch.chdir(tmp_path)
    _check_against_golden("base_train_d4.json", _train(tmp_path / "base", monkeypatch, TABLE))
