"""Conversation packing loader (nanochat/chat_dataloader.py): whole BOS-aligned conversations, padding and
completion-only targets checked against render_conversation, parity with a plain-list reference packer,
over-long conversations truncated instead of jamming the buffer, exact resume, progress, rank sharding
(in-process and on 2 gloo ranks), rejected resume states, the pinned asynchronous copy to CUDA. Byte tokenizer and
an in-memory task."""

import json
import logging
import math
import random
import re

import pytest
import torch

from nanochat import chat_dataloader
from nanochat.chat_dataloader import (STATE_FORMAT, ConversationLoader, ResumeError, gather_loader_states,
                                      packed_conversation_loader, training_progress)
from tasks.common import Task

B, T = 3, 32
CAP = T + 1
BUF = 8
N = 61  # odd, so the rank interleaving swaps parity after the wrap


class TinyChat(Task):
    """Conversations of varied shapes and lengths (~8 to ~110 byte tokens); each user message starts with
    a unique tag "#i|", so every render is distinct and a row can be parsed back into conversations."""

    def __init__(self, n=N, seed=0, long_frac=0.15, **kwargs):
        super().__init__(**kwargs)
        rng = random.Random(seed)
        self.rows = []
        for i in range(n):
            user = f"#{i}|" + "u" * rng.randint(0, 12)
            if rng.random() < long_frac:
                user += "x" * rng.randint(40, 80)  # longer than a row on its own
            kind = rng.random()
            if kind < 0.2:  # a calculator call: python tokens are targets, its output is not
                answer = [{"type": "text", "text": "t" * rng.randint(0, 4)}, {"type": "python", "text": "1+2"},
                          {"type": "python_output", "text": "3"}, {"type": "text", "text": "=3"}]
            else:
                answer = "a" * rng.randint(1, 10)
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            if 0.2 <= kind < 0.35:
                messages += [{"role": "user", "content": "v" * rng.randint(1, 5)},
                             {"role": "assistant", "content": "b" * rng.randint(1, 5)}]
            elif 0.35 <= kind < 0.45:
                messages.insert(0, {"role": "system", "content": "be brief"})
            self.rows.append({"messages": messages})

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return self.rows[index]


def make(task, tok, mode="all", **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("buffer_size", BUF)
    return packed_conversation_loader(task, tok, kw.pop("B", B), kw.pop("T", T), mask_mode=mode, **kw)


def take(loader, n):
    out = []
    for _ in range(n):
        x, y, state = next(loader)
        out.append((x.clone(), y.clone(), json.loads(json.dumps(state))))  # what a checkpoint meta holds
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for i, ((x, y, *_), (rx, ry, *_)) in enumerate(zip(got, want)):
        assert torch.equal(x, rx) and torch.equal(y, ry), f"batch {i} differs"


def as_rank(monkeypatch, rank, world_size):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def renders(task, tok, cap=CAP):
    """{row prefix of each conversation's render: (index, ids, mask)}: a conversation in a row is its whole
    render, or, when longer than a row, its first `cap` tokens."""
    out = {}
    for i in range(len(task)):
        ids, mask = tok.render_conversation(task[i])
        out[tuple(ids[:cap])] = (i, ids[:cap], mask[:cap])
    return out


def parse_row(row, lookup, bos):
    """Split a full row (T+1 ids) at its BOS tokens into [(index, ids, mask)] and the padding length;
    fails unless the content is whole conversations followed only by BOS padding."""
    starts = [p for p, t in enumerate(row) if t == bos] + [len(row)]
    assert starts[0] == 0, "a row must start with BOS"
    placed, pad = [], 0
    for a, b in zip(starts, starts[1:]):
        segment = tuple(row[a:b])
        if segment == (bos,):
            pad += 1  # a lone BOS is padding (a render is never just BOS)
            continue
        assert pad == 0, "content after padding"
        assert segment in lookup, f"row segment at {a} is not a whole conversation: {segment[:12]}..."
        placed.append(lookup[segment])
    return placed, pad


def full_rows(x, y, bos):
    """The (B, T+1) rows of an "all"-mode batch: the last token is the last target, or BOS padding."""
    last = torch.where(y[:, -1:] == -1, torch.full_like(y[:, -1:], bos), y[:, -1:])
    return torch.cat([x, last], dim=1).tolist()


def reference_batches(task, tok, n, mode, rank=0, world_size=1, b=B, t=T, buffer_size=BUF):
    """The packing rule with plain lists and a linear scan (the slow reference)."""
    cap, bos, size = t + 1, tok.get_bos_token_id(), len(task)
    cursor, buffer, out = rank, [], []
    for _ in range(n):
        rows, keeps = [], []
        for _ in range(b):
            row, keep = [], []
            while True:
                while len(buffer) < buffer_size:
                    ids, mask = tok.render_conversation(task[cursor])
                    buffer.append((ids[:cap], [1] * len(ids[:cap]) if mode == "all" else mask[:cap]))
                    cursor = (cursor + world_size) % size
                fits = [i for i, (ids, _) in enumerate(buffer) if len(ids) <= cap - len(row)]
                if not fits:
                    break
                best = max(fits, key=lambda i: (len(buffer[i][0]), -i))  # longest, earliest on ties
                ids, mask = buffer.pop(best)
                row, keep = row + ids, keep + mask
            rows.append(row + [bos] * (cap - len(row)))
            keeps.append(keep + [0] * (cap - len(row)))
        rows, keeps = torch.tensor(rows), torch.tensor(keeps, dtype=torch.bool)
        out.append((rows[:, :-1], torch.where(keeps[:, 1:], rows[:, 1:], -1)))
    return out


# -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["all", "assistant"])
def test_batches_match_the_reference_packer_across_epochs(byte_tokenizer, mode):
    task = TinyChat()
    got = take(make(task, byte_tokenizer, mode), 30)  # ~2 epochs of 61 conversations
    assert_same(got, reference_batches(task, byte_tokenizer, 30, mode))
    x, y, state = got[-1]
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert state["epoch"] >= 2


def test_rows_are_whole_conversations_then_bos_padding(byte_tokenizer):
    task, tok = TinyChat(), byte_tokenizer
    bos, lookup = tok.get_bos_token_id(), renders(task, tok)
    padded_rows = 0
    for x, y, _ in take(make(task, tok), 30):
        for r, row in enumerate(full_rows(x, y, bos)):
            placed, pad = parse_row(row, lookup, bos)
            assert placed, "a row without any conversation"
            if any(len(tok.render_conversation(task[i])[0]) > CAP for i, _, _ in placed):
                assert len(placed) == 1 and pad == 0  # a truncated conversation fills its row alone
            content = CAP - pad
            assert y[r, :content - 1].tolist() == row[1:content]  # "all": every real token is a target
            assert (y[r, content - 1:] == -1).all()  # exactly the targets that predict padding
            padded_rows += pad > 0
    assert padded_rows > 10  # the test exercises padding


def test_assistant_mode_masks_exactly_the_non_assistant_tokens(byte_tokenizer):
    task, tok = TinyChat(), byte_tokenizer
    bos, lookup = tok.get_bos_token_id(), renders(task, tok)
    everything, assistant = take(make(task, tok, "all"), 20), take(make(task, tok, "assistant"), 20)
    seen = set()
    for (x, y, _), (xa, ya, _) in zip(everything, assistant):
        assert torch.equal(x, xa)  # the mask never changes the packing
        for r, row in enumerate(full_rows(x, y, bos)):
            placed, pad = parse_row(row, lookup, bos)
            mask = [m for _, _, conv_mask in placed for m in conv_mask] + [0] * pad
            want = [tok_id if m else -1 for tok_id, m in zip(row[1:], mask[1:])]
            assert ya[r].tolist() == want
            seen.update(ya[r][ya[r] != -1].tolist())
            if (ya[r] == -1).all():  # only a truncated conversation that lost its assistant turn
                assert len(placed) == 1 and pad == 0 and not any(placed[0][2][1:])
    special = tok.encode_special
    assert {special("<|assistant_end|>"), special("<|python_start|>"), special("<|python_end|>")} <= seen
    never = {"<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|output_start|>", "<|output_end|>"}
    assert not {special(s) for s in never} & seen
    assert not {ord("u"), ord("v"), ord("x")} & seen  # user text (the tags' digits also occur in answers' "=3")


@pytest.mark.parametrize("mode", ["all", "assistant"])
def test_rows_always_have_targets_when_conversations_fit(byte_tokenizer, mode):
    for x, y, state in take(make(TinyChat(long_frac=0.0), byte_tokenizer, mode, T=64), 30):  # all fit in 65
        assert (y != -1).sum(dim=1).min() > 0 and state["truncated"] == 0


@pytest.mark.parametrize("mode", ["all", "assistant"])
def test_overlong_conversations_are_truncated_and_never_jam_the_loader(byte_tokenizer, mode, caplog, monkeypatch):
    # With rows of 17 tokens nearly every conversation is too long: upstream's packer would keep them in the
    # buffer forever, emit pure-padding rows and never finish the epoch.
    monkeypatch.setattr(chat_dataloader, "TRUNCATION_LOG_EVERY", 10)
    task, tok, t = TinyChat(n=40, long_frac=0.75), byte_tokenizer, 16
    loader = make(task, tok, mode, T=t)
    bound = math.ceil(len(task) / B)  # every row places at least one conversation
    with caplog.at_level(logging.WARNING, logger="nanochat.chat_dataloader"):
        for step in range(1, bound + 1):
            x, y, state = next(loader)
            assert (x[:, 0] == tok.get_bos_token_id()).all()
            if training_progress(state, -1)[1]:
                break
    assert training_progress(state, -1) == (1.0, True) and step <= bound
    fetched = state["consumed"] + len(state["buffer"])  # one rank: consumed = conversations placed
    too_long = [len(tok.render_conversation(task[i % len(task)])[0]) > t + 1 for i in range(fetched)]
    assert state["truncated"] == loader.truncated == sum(too_long) > 20
    lines = [rec.getMessage() for rec in caplog.records if "truncated" in rec.getMessage()]
    assert len(lines) == 1 + sum(too_long) // 10
    assert lines[0].startswith("1 conversation(s) so far on rank 0 were longer than a row (17 tokens)")


def test_a_row_with_no_assistant_tokens_is_all_ignored_targets(byte_tokenizer):
    # A conversation whose user turn alone overflows the row keeps no assistant token after truncation: its
    # row is all -1 in "assistant" mode (the loss averages over zero targets as 0), and the loader goes on.
    task = TinyChat(n=6, long_frac=1.0)
    x, y, state = next(make(task, byte_tokenizer, "assistant", T=16, B=6, buffer_size=2))
    assert (y == -1).all() and state["truncated"] == 6 + len(state["buffer"]) == 7  # placed + still buffered
    assert (x[:, 0] == byte_tokenizer.get_bos_token_id()).all()


@pytest.mark.parametrize("mode", ["all", "assistant"])
def test_resume_reproduces_the_uninterrupted_batches_exactly(byte_tokenizer, mode):
    task = TinyChat()
    full = take(make(task, byte_tokenizer, mode), 30)
    for k in (1, 9, 17, 26):  # 17 and 26 lie past the first epoch boundary
        resumed = make(task, byte_tokenizer, mode, resume_state_dict=full[k - 1][2])
        assert_same(take(resumed, 30 - k), full[k:])
        assert resumed.state_dict() == full[-1][2]


def test_state_is_json_and_describes_the_loader(byte_tokenizer):
    task = TinyChat()
    loader = make(task, byte_tokenizer, "assistant", split="train")
    states = [s for _, _, s in take(loader, 3)]
    s = states[-1]
    assert s["format"] == STATE_FORMAT and s["split"] == "train" and (s["rank"], s["world_size"]) == (0, 1)
    assert s["dataset_size"] == N and s["batches"] == 3 and s["epoch"] == 1
    assert len(s["buffer"]) == len(s["buffer_lengths"]) == BUF
    assert s["cursor"] == s["consumed"] + BUF  # one rank: everything fetched is placed or buffered
    assert s["buffer"] == sorted(s["buffer"])  # in arrival order
    assert [a["consumed"] for a in states] == sorted({a["consumed"] for a in states})  # grows every batch
    assert len(json.dumps(s)) < 1000


def _record_host_to_cuda_copies(monkeypatch):
    """Stand-ins for Tensor.pin_memory and Tensor.to(<cuda>) on a machine without CUDA: each call is recorded as
    ("pin", tensor is the unpinned one) or ("to", device, non_blocking) and hands back the tensor itself, so the
    loader's CUDA branch runs on CPU."""
    calls, real_to = [], torch.Tensor.to

    def pin_memory(self):
        calls.append(("pin",))
        return self

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device)) and torch.device(args[0]).type == "cuda":
            calls.append(("to", torch.device(args[0]), kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return calls


def test_cuda_batches_are_copied_from_pinned_memory_without_blocking(byte_tokenizer, monkeypatch):
    """On CUDA a batch (inputs and targets in one buffer) goes through pinned host memory and one asynchronous
    copy; on CPU nothing is pinned (pinning needs CUDA) and the batch is the same."""
    task = TinyChat()
    want = take(make(task, byte_tokenizer, "assistant"), 2)
    calls = _record_host_to_cuda_copies(monkeypatch)
    cpu = take(make(task, byte_tokenizer, "assistant"), 2)
    assert calls == []
    got = take(make(task, byte_tokenizer, "assistant", device="cuda"), 2)
    assert calls == [("pin",), ("to", torch.device("cuda"), True)] * 2  # one copy per batch, 2 batches
    assert_same(got, want)
    assert_same(cpu, want)


@pytest.mark.gpu
def test_cuda_batches_equal_the_cpu_batches(byte_tokenizer):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    task = TinyChat()
    got = take(make(task, byte_tokenizer, "assistant", device="cuda"), 3)
    assert all(x.is_cuda and y.is_cuda for x, y, _ in got)
    assert_same([(x.cpu(), y.cpu()) for x, y, _ in got], take(make(task, byte_tokenizer, "assistant"), 3))


def test_training_progress_horizons():
    state = {"batches": 30, "consumed": 45, "dataset_size": 100}
    assert training_progress(state, 60) == (0.5, False)
    assert training_progress(state, 30) == (1.0, True)
    assert training_progress(state, 20) == (1.0, True)  # clamped
    assert training_progress(state, 10, batches_per_step=4) == (0.75, False)  # 30 micro-batches of 40
    assert training_progress(state, -1) == (0.45, False)
    assert training_progress(dict(state, consumed=100), -1) == (1.0, True)
    assert training_progress(dict(state, consumed=103), -1) == (1.0, True)


def test_one_epoch_ends_when_every_conversation_was_placed(byte_tokenizer, monkeypatch):
    task = TinyChat()
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        loader = make(task, byte_tokenizer)
        states = [next(loader)[2] for _ in range(30)]
        lasts = [training_progress(s, -1)[1] for s in states]
        first = lasts.index(True)
        assert not any(lasts[:first]) and all(lasts[first:])
        assert states[first]["consumed"] >= N > states[first - 1]["consumed"]
        assert all(s["consumed"] % 2 == rank for s in states)  # rank-strided: rank + 2 * placed
        progress = [training_progress(s, -1)[0] for s in states]
        assert progress == sorted(progress) and progress[first] == 1.0


def placed_indices(batches, task, tok):
    bos, lookup = tok.get_bos_token_id(), renders(task, tok)
    return [i for x, y, *_ in batches for row in full_rows(x, y, bos) for i, _, _ in parse_row(row, lookup, bos)[0]]


def test_ranks_read_disjoint_interleaved_conversations(byte_tokenizer, monkeypatch):
    task = TinyChat()
    per_rank = []
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        batches = take(make(task, byte_tokenizer), 12)
        assert_same(batches, reference_batches(task, byte_tokenizer, 12, "all", rank=rank, world_size=2))
        first_epoch = [b for b in batches if b[2]["epoch"] == 1]
        placed = placed_indices(first_epoch, task, byte_tokenizer)
        assert placed and all(i % 2 == rank for i in placed)
        per_rank.append(set(placed))
        # Past the wrap (61 is odd) rank 0 goes on with 1, 3, ... and rank 1 with 0, 2, ...
        assert batches[-1][2]["epoch"] == 2 and batches[-1][2]["cursor"] % 2 != rank
    assert not per_rank[0] & per_rank[1]


def _two_rank_worker(rank, world_size, tok):
    task = TinyChat()
    full = take(make(task, tok), 10)
    merged = gather_loader_states(full[3][2])  # a collective: every rank's state ends up in one dict
    resumed = take(make(task, tok, resume_state_dict=json.loads(json.dumps(merged))), 6)
    return {"full": full, "resumed": resumed, "merged": merged}


@pytest.mark.slow  # spawns two interpreters: ~10 s on 2 quiet cores, a minute on busy ones
def test_two_gloo_ranks_read_disjoint_data_and_resume_from_the_gathered_state(byte_tokenizer, run_on_ranks):
    out = run_on_ranks(_two_rank_worker, byte_tokenizer, world_size=2)
    task = TinyChat()
    assert out[0]["merged"] == out[1]["merged"]
    assert [s["rank"] for s in out[0]["merged"]["ranks"]] == [0, 1]
    placed = []
    for rank, result in enumerate(out):
        assert_same(result["resumed"], result["full"][4:])
        placed.append(placed_indices(result["full"][:4], task, byte_tokenizer))
        assert all(i % 2 == rank for i in placed[-1])
    assert placed[0] and placed[1] and not set(placed[0]) & set(placed[1])


def test_mismatched_resume_states_are_rejected(byte_tokenizer, monkeypatch):
    task = TinyChat()
    state = take(make(task, byte_tokenizer, split="train"), 2)[-1][2]
    cases = [
        (state, 2, 0, "saved with world size 1 and this run has 2; relaunch with 1 processes"),
        ({"epoch": 1, "ranks": [state]}, 2, 1, "saved by 1 ranks and this run has 2"),
        (dict(state, rank=0, world_size=2), 2, 1, "is rank 0's and this is rank 1"),
        (dict(state, format="bestfit-exact-1"), 1, 0, "not a chat loader state"),
        (dict(state, dataset_size=N + 1), 1, 0, f"dataset of {N + 1} conversations and this one has {N}"),
        (dict(state, split="val"), 1, 0, "'val' split, not 'train'"),
        (dict(state, buffer_lengths=[n + 1 for n in state["buffer_lengths"]]), 1, 0,
         "the dataset or the tokenizer changed"),
    ]
    for bad, world_size, rank, message in cases:
        if world_size > 1:
            as_rank(monkeypatch, rank, world_size)
        else:
            for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                monkeypatch.delenv(var, raising=False)
        with pytest.raises(ResumeError, match=re.escape(message)) as info:
            make(task, byte_tokenizer, split="train", resume_state_dict=bad)
        assert "\n" not in str(info.value)


def test_changed_settings_warn_but_keep_the_data_order(byte_tokenizer, caplog):
    task = TinyChat()
    state = take(make(task, byte_tokenizer), 2)[-1][2]
    with caplog.at_level(logging.WARNING, logger="nanochat.chat_dataloader"):
        loader = make(task, byte_tokenizer, B=2, resume_state_dict=state)
    assert "B 3 -> 2" in caplog.text
    assert loader.state_dict()["buffer"] == state["buffer"] and loader.cursor == state["cursor"]


def test_bad_arguments_are_one_line_errors(byte_tokenizer, monkeypatch):
    task = TinyChat(n=1)
    with pytest.raises(ValueError, match="mask_mode"):
        make(task, byte_tokenizer, "completion")
    with pytest.raises(ValueError, match="T must be a positive int"):
        make(task, byte_tokenizer, T=0)
    as_rank(monkeypatch, 1, 2)
    with pytest.raises(ValueError, match="1 conversations, fewer than the 2 ranks"):
        ConversationLoader(task, byte_tokenizer, B, T, device="cpu")


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "8"])
def test_both_loaders_check_sizes_and_default_the_device_alike(byte_tokenizer, bad):
    # One check serves both loaders: the pretraining copy once accepted B=True where this one refused it.
    from nanochat.dataloader import BestFitLoader, loader_device

    builds = (lambda: BestFitLoader(byte_tokenizer, bad, T, "train"),
              lambda: ConversationLoader(TinyChat(n=4), byte_tokenizer, bad, T))
    for build in builds:
        with pytest.raises(ValueError, match=f"^B must be a positive int, got {re.escape(repr(bad))}$"):
            build()
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert loader_device(None) == ConversationLoader(TinyChat(n=4), byte_tokenizer, B, T).device == expected
