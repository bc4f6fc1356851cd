"""Midtraining, SFT and RL end to end on CPU with a micro model and offline data: each stage learns (or, for
RL, runs its rollouts and update), writes a checkpoint the next stage loads, resumes bit-exactly, and
fails with one line when its source is missing."""

import glob
import os
import shutil

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.tokenizer import compute_token_bytes
from scripts import chat_rl, chat_sft, mid_train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "apple banana cherry river stone lantern orbit meadow thunder violet harbor pencil canyon ember".split()
# Rows of 32 tokens, 2 micro-batches of 4 rows per step; LRs high enough for a micro model to move in 8 steps.
FINETUNE = ["--device-type=cpu", "--max-seq-len=32", "--device-batch-size=4", "--total-batch-size=256",
            "--eval-tokens=256", "--embedding-lr=0.5", "--unembedding-lr=0.02", "--matrix-lr=0.05"]
SFT_EXTRA = ["--chatcore-every=-1", "--load-optimizer=1"]
RL = ["--device-type=cpu", "--examples-per-step=2", "--num-samples=4", "--device-batch-size=2", "--max-new-tokens=8",
      "--eval-examples=2", "--init-lr-frac=1.0"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, byte_tokenizer):
    """A base dir with the byte tokenizer, a small word list (no download) and a micro base checkpoint."""
    from conftest import _make_tiny_gpt

    base = tmp_path_factory.mktemp("posttrain")
    byte_tokenizer.save(str(base / "tokenizer"))
    torch.save(compute_token_bytes(byte_tokenizer), base / "tokenizer" / "token_bytes.pt")
    (base / "words_alpha.txt").write_text("\n".join(WORDS) + "\n")
    model = _make_tiny_gpt(sequence_len=64, scrambled=True)
    config = {k: getattr(model.config, k) for k in model.config.__dataclass_fields__}
    save_checkpoint(str(base / "base_checkpoints" / "d2"), 10, model.state_dict(), None,
                    {"step": 10, "model_config": config, "device_batch_size": 4, "max_seq_len": 32, "total_batch_size": 256,
                     "user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02}})
    return base


@pytest.fixture
def base(pipeline, tmp_path, monkeypatch, offline_tasks):
    """A private copy of the pipeline dir, offline: no hub datasets (GSM8K becomes synthetic problems)."""
    copy = tmp_path / "base"
    shutil.copytree(pipeline, copy)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(copy))
    monkeypatch.chdir(tmp_path)
    return copy


def _val_bpbs(caplog):
    import re

    return [float(m.group(1)) for r in caplog.records if (m := re.search(r"Validation bpb: ([0-9.]+)", r.getMessage()))]


def test_mid_sft_rl_chain_learns_and_hands_over(base, caplog):
    caplog.set_level("INFO")
    mid_train.main(FINETUNE + ["--num-iterations=8", "--eval-every=4"])
    mid_bpb = _val_bpbs(caplog)
    assert len(mid_bpb) == 3 and mid_bpb[-1] < mid_bpb[0], mid_bpb
    assert (base / "mid_checkpoints" / "d2" / "model_000008.pt").exists()
    section = (base / "report" / "midtraining.md").read_text()
    assert "- Number of iterations: 8" in section and "SyntheticArithmetic" in section or "synthetic" in section

    caplog.clear()
    chat_sft.main(FINETUNE[:1] + ["--num-iterations=8", "--eval-every=4", "--eval-tokens=256"] + SFT_EXTRA)  # geometry inherited
    sft_bpb = _val_bpbs(caplog)
    assert len(sft_bpb) == 3 and sft_bpb[-1] < sft_bpb[0], sft_bpb
    messages = [r.getMessage() for r in caplog.records]
    assert any("Starting from the mid checkpoint d2, step 8" in m for m in messages)
    assert any("Device batch 4 x 32 tokens" in m for m in messages)  # inherited from the mid checkpoint
    assert not any("fresh moments" in m for m in messages)  # warm-started from mid's optimizer shard
    assert (base / "report" / "chat-sft.md").read_text().startswith("## Chat SFT")

    caplog.clear()
    result, history = chat_rl.main(RL + ["--num-iterations=2", "--eval-every=1", "--save-every=-1"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("Starting from the sft checkpoint d2, step 8" in m for m in messages)
    assert any("RL on SyntheticArithmetic" in m for m in messages)
    assert len(history) == 2 and all(0.0 <= reward <= 1.0 for reward, _ in history)
    assert "pass@1" in result.metrics and "pass@2" in result.metrics
    assert (base / "chatrl_checkpoints" / "d2" / "model_000002.pt").exists()
    assert "synthetic" in (base / "report" / "chat-rl.md").read_text()


def _resume_matches(base, main, stage_dir, args, steps, every):
    """`steps` straight == `every` steps, then a resume from that step in another tag: same final weights."""
    main(args + [f"--num-iterations={steps}", f"--save-every={every}", "--model-tag=d2"])
    ckpt = base / stage_dir
    os.makedirs(ckpt / "resumed")
    for path in glob.glob(str(ckpt / "d2" / f"*_{every:06d}*")):
        shutil.copy(path, ckpt / "resumed")
    main(args + [f"--num-iterations={steps}", f"--save-every={every}", "--model-tag=resumed", f"--resume-from-step={every}"])
    a = torch.load(ckpt / "d2" / f"model_{steps:06d}.pt")
    b = torch.load(ckpt / "resumed" / f"model_{steps:06d}.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_midtraining_resume_is_bit_exact(base):
    _resume_matches(base, mid_train.main, "mid_checkpoints", FINETUNE + ["--eval-every=-1"], steps=4, every=2)


@pytest.mark.slow
def test_rl_resume_is_bit_exact(base):
    mid_train.main(FINETUNE + ["--num-iterations=2", "--eval-every=-1"])
    chat_sft.main(FINETUNE[:1] + ["--num-iterations=2", "--eval-every=-1", "--eval-tokens=256"] + SFT_EXTRA)
    _resume_matches(base, chat_rl.main, "chatrl_checkpoints", RL + ["--eval-every=-1"], steps=3, every=1)


def test_missing_source_checkpoint_is_one_line(base):
    with pytest.raises(SystemExit) as exc:
        chat_sft.main(FINETUNE + SFT_EXTRA)  # no midtraining yet
    assert exc.value.code.startswith("chat_sft: error: no checkpoint directory") and "scripts.mid_train" in exc.value.code


def test_policy_gradient_moves_probability_toward_the_advantaged_answer(tiny_gpt):
    from nanochat.rl import policy_gradient_loss

    model = tiny_gpt(scrambled=True)
    prompt = [256, 1, 2, 3]
    good, bad = 65, 66  # two one-token answers to the same prompt
    inputs = torch.tensor([prompt, prompt])
    targets = torch.full((2, 4), -1)
    targets[0, -1], targets[1, -1] = good, bad
    advantages = torch.tensor([0.5, -0.5])

    def logp():
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0, -1].log_softmax(-1)
        return logits[good].item(), logits[bad].item()

    before = logp()
    loss = policy_gradient_loss(model, inputs, (targets, advantages))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    after = logp()
    assert after[0] > before[0] and after[1] < before[1]


def test_rollouts_train_sampled_tokens_and_the_stop_token_only(byte_tokenizer):
    """Prompt and tool-output tokens are never targets; the sampled <|assistant_end|> is."""
    from nanochat.rl import RolloutStream
    from tasks.arithmetic import SyntheticArithmetic

    end = byte_tokenizer.encode_special("<|assistant_end|>")
    out_start, out_end = byte_tokenizer.encode_special("<|output_start|>"), byte_tokenizer.encode_special("<|output_end|>")

    class ScriptedEngine:  # answers "7", a forced tool output, then stops; the second answer never stops
        model = torch.nn.Linear(1, 1)

        def generate(self, tokens, num_samples, max_tokens, temperature, top_k, seed):
            script = [(55, 1), (out_start, 0), (56, 0), (out_end, 0), (end, 1)]
            for step in range(max_tokens):
                column = [script[step][0] if step < len(script) else end, 57]
                masks = [script[step][1] if step < len(script) else 0, 1]
                yield column, masks

    stream = RolloutStream(SyntheticArithmetic(size=4), byte_tokenizer, ScriptedEngine(), examples_per_step=1, num_samples=2,
                           device_batch_size=2, max_new_tokens=6, temperature=1.0, top_k=0)
    inputs, (targets, advantages), state = next(stream)
    assert inputs.shape == targets.shape and advantages.shape == (2,)
    trained = [targets[row][targets[row] >= 0].tolist() for row in range(2)]
    assert trained[0] == [55, end]  # the sampled "7" and the sampled stop token; the tool output is not trained
    assert trained[1] == [57] * 6  # an answer cut at max_new_tokens: every sampled token, no stop token
    assert state["examples_done"] == 1 and state["format"] == "rl-rollouts-1"


@pytest.mark.slow
def test_every_stage_runs_under_torchrun(base):
    """mid -> SFT -> RL on 2 gloo ranks: each writes both ranks' optimizer shards and the next one loads them."""
    from dist_harness import run_torchrun

    env = {k: os.environ[k] for k in ("NANOCHAT_BASE_DIR", "NANOCHAT_TASKS_DIR", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    stages = [("scripts.mid_train", FINETUNE + ["--num-iterations=2", "--eval-every=2"], "mid_checkpoints", 2),
              ("scripts.chat_sft", FINETUNE[:1] + ["--num-iterations=2", "--eval-every=2", "--eval-tokens=256"] + SFT_EXTRA,
               "chatsft_checkpoints", 2),
              ("scripts.chat_rl", RL + ["--num-iterations=2", "--eval-every=1", "--save-every=-1"], "chatrl_checkpoints", 2)]
    for module, args, directory, step in stages:
        run_torchrun(["-m", module, "--"] + args, nproc=2, env=env, timeout=900)
        for rank in (0, 1):
            assert (base / directory / "d2" / f"optim_{step:06d}_rank{rank}.pt").exists(), (module, rank)
