"""Checkpoints (nanochat/checkpoint_manager.py): file layout and round trip, crash-safe saves, discovery of
tags and steps, clear errors for missing/corrupt files, build_model's patches (with a stand-in GPT module
so that these tests exercise the checkpoint logic alone), and the save barrier across 2 gloo ranks."""

import io
import json
import os
import subprocess
import sys
import time
import types
from dataclasses import asdict

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.checkpoint_manager import (CheckpointCorruptError, CheckpointNotFoundError, build_model,
                                         find_largest_model, find_last_step, load_checkpoint, load_model,
                                         load_optimizer_state, save_checkpoint)
from nanochat.gpt import GPTConfig


@pytest.fixture(autouse=True)
def single_process(base_dir, monkeypatch):
    """Every test: the kit's fresh NANOCHAT_BASE_DIR and no torchrun environment."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def tiny_training_state(seed=0):
    """A small model state_dict and an optimizer-shaped state dict (torch.optim itself costs seconds to import)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optim_state = {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(p)} for i, p in enumerate(net.parameters())},
                   "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0, 1, 2, 3]}]}
    return net, optim_state


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_and_file_layout(tmp_path):
    net, opt = tiny_training_state()
    ckpt = tmp_path / "base_checkpoints" / "d4"
    meta = {"step": 42, "val_bpb": 1.25, "model_config": {"n_layer": 4}, "note": "héllo"}
    save_checkpoint(str(ckpt), 42, net.state_dict(), opt, meta, rank=0)
    assert sorted(os.listdir(ckpt)) == ["meta_000042.json", "model_000042.pt", "optim_000042_rank0.pt"]
    assert (ckpt / "meta_000042.json").read_text(encoding="utf-8") == json.dumps(meta, indent=2, ensure_ascii=False)
    model_data, optim_data, meta_back = load_checkpoint(str(ckpt), 42, "cpu", load_optimizer=True)
    assert_state_equal(model_data, net.state_dict())
    assert meta_back == meta
    assert optim_data["param_groups"] == opt["param_groups"]
    for i in opt["state"]:
        assert_state_equal(optim_data["state"][i], opt["state"][i])
    assert load_checkpoint(str(ckpt), 42, "cpu")[1] is None
    # Other ranks write only their optimizer shard; no optimizer data means no optimizer file.
    save_checkpoint(str(ckpt), 43, net.state_dict(), opt, meta, rank=1)
    save_checkpoint(str(ckpt), 44, net.state_dict(), None, meta, rank=0)
    names = set(os.listdir(ckpt))
    assert "optim_000043_rank1.pt" in names and "model_000043.pt" not in names and "meta_000043.json" not in names
    assert "model_000044.pt" in names and not any(n.startswith("optim_000044") for n in names)


class SimulatedCrash(BaseException):
    """Stands in for the process dying in the middle of a write."""


def crash_half_way(real_save):
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise SimulatedCrash()

    return save


def test_a_crash_mid_save_leaves_the_old_file_loadable_and_no_partial_file(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    net_a, opt_a = tiny_training_state(0)
    save_checkpoint(ckpt, 5, net_a.state_dict(), opt_a, {"step": 5})
    before = set(os.listdir(ckpt))
    net_b, opt_b = tiny_training_state(1)
    monkeypatch.setattr(torch, "save", crash_half_way(torch.save))
    with pytest.raises(SimulatedCrash):  # overwriting step 5
        save_checkpoint(ckpt, 5, net_b.state_dict(), opt_b, {"step": 5})
    with pytest.raises(SimulatedCrash):  # a new step
        save_checkpoint(ckpt, 7, net_b.state_dict(), opt_b, {"step": 7})
    monkeypatch.undo()
    assert set(os.listdir(ckpt)) == before  # no partial or temp file anywhere
    assert_state_equal(load_checkpoint(ckpt, 5, "cpu")[0], net_a.state_dict())
    assert find_last_step(ckpt) == 5


def test_a_crash_before_the_meta_means_the_step_does_not_count(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    net, opt = tiny_training_state()
    save_checkpoint(ckpt, 5, net.state_dict(), opt, {"step": 5})

    def no_fsync(fd):
        raise SimulatedCrash()

    monkeypatch.setattr(os, "fsync", no_fsync)  # the torch files of step 9 are fsynced too: allow them
    monkeypatch.setattr(cm, "atomic_torch_save", lambda obj, path: torch.save(obj, path))
    with pytest.raises(SimulatedCrash):
        save_checkpoint(ckpt, 9, net.state_dict(), opt, {"step": 9})
    monkeypatch.undo()
    assert os.path.exists(os.path.join(ckpt, "model_000009.pt"))
    assert not os.path.exists(os.path.join(ckpt, "meta_000009.json"))
    # A SIGKILL during an atomic write leaves a hidden temp file behind: never mistaken for a checkpoint.
    open(os.path.join(ckpt, ".model_000011.pt.x1y2.tmp"), "wb").write(b"half")
    assert find_last_step(ckpt) == 5
    with pytest.raises(CheckpointNotFoundError, match="meta_000009.json is missing"):
        load_checkpoint(ckpt, 9, "cpu")


def touch_checkpoint(directory, step, mtime=None):
    os.makedirs(directory, exist_ok=True)
    torch.save({"w": torch.zeros(1)}, os.path.join(directory, f"model_{step:06d}.pt"))
    with open(os.path.join(directory, f"meta_{step:06d}.json"), "w") as f:
        json.dump({"step": step}, f)
    if mtime is not None:
        os.utime(directory, (mtime, mtime))


def test_discovery_of_tags_and_steps(tmp_path):
    root = tmp_path / "base_checkpoints"
    now = time.time()
    touch_checkpoint(root / "d12", 100, mtime=now - 50)
    touch_checkpoint(root / "d4", 900, mtime=now)
    touch_checkpoint(root / "d24_jan", 20, mtime=now - 100)
    touch_checkpoint(root / "custom", 1, mtime=now + 10)
    os.makedirs(root / "d99")  # no checkpoint in it: ignored
    assert find_largest_model(str(root)) == "d24_jan"  # prefix match: d24_jan reads as 24
    touch_checkpoint(root / "d24", 30, mtime=now - 10)  # same depth: the newer directory wins
    assert find_largest_model(str(root)) == "d24"

    plain = tmp_path / "plain"
    touch_checkpoint(plain / "alpha", 1, mtime=now - 10)
    touch_checkpoint(plain / "beta", 1, mtime=now)
    assert find_largest_model(str(plain)) == "beta"  # no d<N> tags: most recently modified

    steps = root / "d12"
    for step in (5, 1000, 250):
        touch_checkpoint(steps, step)
    (steps / "model_notastep.pt").write_bytes(b"")
    (steps / "model_002000.pt.bak").write_bytes(b"")
    assert find_last_step(str(steps)) == 1000


def test_missing_checkpoints_say_what_to_run(base_dir):
    with pytest.raises(CheckpointNotFoundError, match=r"python -m scripts\.base_train") as e:
        load_model("base", "cpu", phase="eval")
    assert isinstance(e.value, FileNotFoundError)  # scripts catch FileNotFoundError
    os.makedirs(base_dir / "chatsft_checkpoints" / "d12")
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoints in .*chatsft_checkpoints.*scripts\.chat_sft"):
        load_model("sft", "cpu", phase="eval")
    touch_checkpoint(base_dir / "mid_checkpoints" / "d12", 7)
    with pytest.raises(CheckpointNotFoundError, match=r"no model tag 'd20' .*available: d12"):
        load_model("mid", "cpu", phase="eval", model_tag="d20")
    with pytest.raises(CheckpointNotFoundError, match=r"step 8 .*steps present: 7"):
        load_model("mid", "cpu", phase="eval", model_tag="d12", step=8)
    with pytest.raises(ValueError, match="unknown checkpoint source 'chat'; use one of base, mid, sft, rl"):
        load_model("chat", "cpu", phase="eval")


def test_corrupt_files_are_named_with_what_to_do(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    net, opt = tiny_training_state()
    save_checkpoint(ckpt, 3, net.state_dict(), opt, {"step": 3})
    path = cm.model_path(ckpt, 3)
    data = open(path, "rb").read()
    for bad in (data[: len(data) // 2], b"\x00garbage" * 10, b""):
        open(path, "wb").write(bad)
        with pytest.raises(CheckpointCorruptError) as e:
            load_checkpoint(ckpt, 3, "cpu")
        assert path in str(e.value) and "corrupt or truncated" in str(e.value)
        assert "delete it or resume from an earlier step" in str(e.value)
    open(cm.meta_path(ckpt, 3), "w").write('{"step": 3, "val')
    with pytest.raises(CheckpointCorruptError, match=r"meta_000003\.json is corrupt or truncated"):
        load_checkpoint(ckpt, 3, "cpu")


# -----------------------------------------------------------------------------
# build_model / load_model against a stand-in nanochat.gpt with the same interface


class FakeGPT(torch.nn.Module):
    """The parts of GPT that build_model relies on: meta-device construction, init_weights, the keys."""

    def __init__(self, config, compute_dtype=None):
        super().__init__()
        self.config = config
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = torch.nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = torch.nn.Parameter(torch.empty(config.n_layer))
        self.smear_gate = torch.nn.Linear(3, 1, bias=False)
        self.smear_lambda = torch.nn.Parameter(torch.empty(1))
        self.backout_lambda = torch.nn.Parameter(torch.empty(1))
        self.register_buffer("cos", torch.empty(config.sequence_len), persistent=False)

    def init_weights(self):
        for p in self.parameters():
            torch.nn.init.normal_(p)
        self.wte.to(dtype=torch.bfloat16)  # like GPT on a bf16 device: embeddings in the compute dtype
        self.cos.copy_(torch.arange(self.config.sequence_len, dtype=torch.float32))


class FakeTokenizer:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def get_vocab_size(self):
        return self.vocab_size


@pytest.fixture
def fake_gpt(monkeypatch):
    module = types.ModuleType("nanochat.gpt")
    module.GPT, module.GPTConfig = FakeGPT, GPTConfig  # the real config: a plain dataclass
    monkeypatch.setitem(sys.modules, "nanochat.gpt", module)
    import nanochat.tokenizer
    monkeypatch.setattr(nanochat.tokenizer, "get_tokenizer", lambda: FakeTokenizer(300))
    return module


def trained_fake(seed=0, **config):
    torch.manual_seed(seed)
    small = dict(sequence_len=8, vocab_size=300, n_layer=2, n_head=1, n_kv_head=1, n_embd=4)
    model = FakeGPT(GPTConfig(**{**small, **config}))
    model.init_weights()
    return model


def test_build_model_patches_old_and_compiled_checkpoints(fake_gpt, tmp_path):
    src = trained_fake()
    state = {"_orig_mod." + k: v for k, v in src.state_dict().items()}  # saved from a torch.compile'd model
    state["_orig_mod.wte.weight"] = state["_orig_mod.wte.weight"].float()  # an fp32-embedding run
    state["_orig_mod.lm_head.weight"] = state["_orig_mod.lm_head.weight"].bfloat16()
    for key in ("resid_lambdas", "x0_lambdas", "smear_lambda", "smear_gate.weight", "backout_lambda"):
        del state["_orig_mod." + key]  # parameters that older checkpoints lack
    config = asdict(src.config)
    del config["window_pattern"]  # old meta (and upstream's midtraining) omit it
    ckpt = str(tmp_path / "base_checkpoints" / "d2")
    save_checkpoint(ckpt, 10, state, None, {"step": 10, "model_config": config})

    model, tok, meta = build_model(ckpt, 10, "cpu", phase="eval")
    assert model.config.window_pattern == "L" and meta["step"] == 10 and tok.get_vocab_size() == 300
    assert not model.training
    assert model.wte.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.wte.weight, src.wte.weight)
    assert torch.equal(model.lm_head.weight, src.lm_head.weight.bfloat16().float())
    assert torch.equal(model.resid_lambdas, torch.ones(2)) and torch.equal(model.x0_lambdas, torch.zeros(2))
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == 0
    assert torch.equal(model.cos, torch.arange(8.0))  # buffers come from init_weights
    assert model.wte.weight.requires_grad
    assert build_model(ckpt, 10, "cpu", phase="train")[0].training
    with pytest.raises(ValueError, match="phase must be 'train' or 'eval'"):
        build_model(ckpt, 10, "cpu", phase="infer")


def test_build_model_rejects_foreign_weights_and_wrong_tokenizers(fake_gpt, tmp_path, monkeypatch):
    src = trained_fake()
    ckpt = str(tmp_path / "ckpt")
    state = dict(src.state_dict(), extra_head=torch.zeros(3))
    save_checkpoint(ckpt, 1, state, None, {"step": 1, "model_config": asdict(src.config)})
    with pytest.raises(CheckpointCorruptError, match=r"model_000001\.pt does not fit the model.*extra_head"):
        build_model(ckpt, 1, "cpu", phase="eval")
    save_checkpoint(ckpt, 2, src.state_dict(), None, {"step": 2, "model_config": asdict(src.config)})
    import nanochat.tokenizer
    monkeypatch.setattr(nanochat.tokenizer, "get_tokenizer", lambda: FakeTokenizer(512))
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but checkpoint .* was trained with 300"):
        build_model(ckpt, 2, "cpu", phase="eval")


def test_load_model_maps_every_source_to_its_directory(fake_gpt, base_dir):
    for i, (source, dirname) in enumerate(cm.SOURCE_DIRS.items()):
        src = trained_fake(seed=i)
        for tag, step in (("d2", 5 + i), ("d2", 7 + i)):
            save_checkpoint(str(base_dir / dirname / tag), step, src.state_dict(), {"s": torch.tensor(i)},
                            {"step": step, "model_config": asdict(src.config)})
        model, _, meta = load_model(source, "cpu", phase="eval")
        assert meta["step"] == 7 + i and torch.equal(model.lm_head.weight, src.lm_head.weight)
        assert load_model(source, "cpu", phase="eval", model_tag="d2", step=5 + i)[2]["step"] == 5 + i
        assert load_optimizer_state(source, "cpu", rank=0)["s"].item() == i
        assert load_optimizer_state(source, "cpu", rank=3) is None


# -----------------------------------------------------------------------------
# 2 processes: nobody returns from save_checkpoint before the whole checkpoint is on disk


def _save_worker(rank, world_size, ckpt):
    if rank == 0:  # a slow disk on rank 0
        real_write = cm.atomic_write

        def slow_write(path, data):
            time.sleep(1.0)
            real_write(path, data)

        cm.atomic_write = slow_write
    save_checkpoint(ckpt, 3, {"w": torch.ones(2)}, {"rank": torch.tensor(rank)}, {"step": 3}, rank=rank)
    return sorted(os.listdir(ckpt))


@pytest.mark.slow  # spawns two interpreters: ~10 s on 2 busy cores
def test_every_rank_returns_only_after_the_checkpoint_is_complete(tmp_path, run_on_ranks):
    seen = run_on_ranks(_save_worker, str(tmp_path / "ckpt"))
    want = ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt", "optim_000003_rank1.pt"]
    assert seen[0] == want and seen[1] == want


def test_build_model_with_the_real_gpt(base_dir, tiny_gpt, monkeypatch):
    import nanochat.tokenizer

    monkeypatch.setattr(nanochat.tokenizer, "get_tokenizer", lambda: FakeTokenizer(300))
    # compute_dtype=None: the dtype a training script would build it in on this machine.
    src = tiny_gpt(vocab_size=300, sequence_len=16, window_pattern="SL", compute_dtype=None)
    config = src.config
    # As written by a bf16 GPU run through torch.compile.
    state = {"_orig_mod." + k: (v.bfloat16() if v.is_floating_point() else v) for k, v in src.state_dict().items()}
    ckpt = str(base_dir / "base_checkpoints" / "d2")
    save_checkpoint(ckpt, 4, state, None, {"step": 4, "model_config": asdict(config)})
    model, _, meta = load_model("base", "cpu", phase="eval")
    assert model.config == config and meta["step"] == 4 and not model.training
    for key, value in src.state_dict().items():
        got = model.state_dict()[key]
        assert got.dtype == value.dtype, key  # the dtype a fresh model has here, whatever the file held
        assert torch.equal(got, value.bfloat16().to(value.dtype)), key
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert model(idx).shape == (1, 8, 300)


def test_eval_models_take_the_inference_dtype_and_train_models_the_compute_dtype(base_dir, tiny_gpt, monkeypatch):
    """On a CPU where training would run in bf16, a model loaded to generate or evaluate is fp32 (faster there),
    and the Engine's KV cache follows the model's dtype."""
    import nanochat.tokenizer
    from nanochat import common
    from nanochat.engine import Engine

    monkeypatch.setattr(nanochat.tokenizer, "get_tokenizer", lambda: FakeTokenizer(300))
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    bf16 = lambda: (torch.bfloat16, "test: a CPU with native bf16")  # noqa: E731
    monkeypatch.setattr(common, "get_compute_dtype", bf16)
    monkeypatch.setattr(cm, "get_compute_dtype", bf16)
    src = tiny_gpt(vocab_size=300, sequence_len=16)
    save_checkpoint(str(base_dir / "base_checkpoints" / "d2"), 1, src.state_dict(), None, {"step": 1, "model_config": asdict(src.config)})
    evaluated, _, _ = load_model("base", "cpu", phase="eval")
    trained, _, _ = load_model("base", "cpu", phase="train")
    assert evaluated.compute_dtype == torch.float32 and trained.compute_dtype == torch.bfloat16
    assert Engine(evaluated).kv_dtype == torch.float32 and Engine(trained).kv_dtype == torch.bfloat16


KILLED_MID_SAVE = """
import os, signal, sys, torch
from nanochat.checkpoint_manager import save_checkpoint
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed once the weights are in the temp file
save_checkpoint(sys.argv[1], 7, {"w": torch.ones(1000)}, None, {"step": 7})
"""


def test_the_next_save_removes_what_a_killed_save_left(tmp_path, caplog):
    ckpt = tmp_path / "d2"
    save_checkpoint(str(ckpt), 5, {"w": torch.zeros(3)}, None, {"step": 5})
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(ckpt)], timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert killed.returncode == -9
    stale = [name for name in os.listdir(ckpt) if name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".model_000007.pt.")
    (ckpt / "notes.tmp").write_text("not ours")  # only the save's own temp files go
    cm._swept_dirs.discard(str(ckpt))  # as in a new process
    with caplog.at_level("INFO", logger="nanochat.checkpoint_manager"):
        save_checkpoint(str(ckpt), 6, {"w": torch.ones(3)}, None, {"step": 6})
    assert sorted(os.listdir(ckpt)) == ["meta_000005.json", "meta_000006.json", "model_000005.pt", "model_000006.pt",
                                        "notes.tmp"]
    lines = [r.getMessage() for r in caplog.records if "interrupted save" in r.getMessage()]
    assert lines == [f"Removed 1 temporary file(s) (0.00 GB) left by an interrupted save in {ckpt}"]
    assert find_last_step(str(ckpt)) == 6
