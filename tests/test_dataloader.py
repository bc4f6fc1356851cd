"""BOS-aligned best-fit loader (nanochat/dataloader.py): parity with a plain-list reference packer written
from the spec, exact resume, rank sharding, pinned-memory device detection, the prefetch thread, errors.
Tiny shards and a tiny tiktoken tokenizer built in tmp_path; no network, no ~/.cache."""

import gc
import json
import os
import random
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

from nanochat import dataloader
from nanochat.dataloader import (ResumeError, gather_loader_states, tokenizing_distributed_data_loader_bos_bestfit,
                                 tokenizing_distributed_data_loader_with_state_bos_bestfit)
from nanochat.dataset import DatasetError

B, T = 2, 16
TBS = 4  # tokenizer batch size: row groups of 10 rows give text batches of 4, 4, 2
BUF = 8
WORDS = ["the", "then", "cat", "in", "a", "hat", "there", "and", "an", "er", "x", "quite", "long", "word", ",", "."]


class TinyTokenizer:
    """Byte-level tiktoken encoding with a few merges and a <|bos|> special token."""

    def __init__(self, fail_after=None):
        ranks = {bytes([i]): i for i in range(256)}
        for merge in (b"th", b"he", b"the", b"in", b"an", b"er", b" t", b" the"):
            ranks[merge] = len(ranks)
        self.bos = len(ranks)
        self.enc = tiktoken.Encoding("tiny", pat_str=r"""\s?\w+|\s?[^\w\s]+|\s+""", mergeable_ranks=ranks,
                                     special_tokens={"<|bos|>": self.bos})
        self.calls, self.fail_after = [], fail_after

    def get_bos_token_id(self):
        return self.bos

    def encode(self, texts, prepend=None, num_threads=8):
        self.calls.append(num_threads)
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise RuntimeError("tokenizer exploded")
        rows = self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [[prepend] + r for r in rows] if prepend is not None else rows


def random_doc(rng):
    # Lengths from 1 to ~60 tokens so that documents fit, tie and overflow a T+1 = 17 row.
    n = rng.choice([0, 1, 2, 3, 5, 8, 12, 20])
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_shards(data_dir, num_files=4, row_groups=3, rows=10, seed=0):
    rng = random.Random(seed)
    os.makedirs(data_dir, exist_ok=True)
    paths = []
    for f in range(num_files):
        texts = [random_doc(rng) for _ in range(row_groups * rows)]
        if f == 1:
            texts[3] = None  # a null row is skipped, not encoded
        path = os.path.join(data_dir, f"shard_{f:05d}.parquet")
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=rows)
        paths.append(path)
    return paths


@pytest.fixture
def data_dir(base_dir, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    d = str(base_dir / "base_data_climbmix")
    write_shards(d)
    return d


def as_rank(monkeypatch, rank, world_size):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def reference_batches(files, tok, n, rank=0, world_size=1, start_rg=None, b=B, t=T, tbs=TBS, buffer_size=BUF):
    """The spec's algorithm with a plain list and linear scans (the slow reference)."""

    def text_batches():
        first = True
        while True:
            for f in files:
                pf = pq.ParquetFile(f)
                rg0 = start_rg if (first and start_rg is not None and f == files[0]) else rank
                for rg in range(rg0, pf.num_row_groups, world_size):
                    texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                    for i in range(0, len(texts), tbs):
                        yield [x for x in texts[i:i + tbs] if x is not None]
            first = False

    source, buffer, out = text_batches(), [], []
    for _ in range(n):
        rows = []
        for _ in range(b):
            row = []
            while len(row) < t + 1:
                while len(buffer) < buffer_size:
                    buffer.extend(tok.encode(next(source), prepend=tok.get_bos_token_id()))
                remaining = t + 1 - len(row)
                best, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best >= 0:
                    row.extend(buffer.pop(best))
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row.extend(buffer.pop(shortest)[:remaining])
            rows.append(row)
        rows = torch.tensor(rows)
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def take(loader, n):
    out = []
    for _ in range(n):
        x, y, state = next(loader)
        out.append((x.clone(), y.clone(), json.loads(json.dumps(state))))  # what a checkpoint meta holds
    return out


def make(tok, split="train", **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("prefetch", 0)
    return tokenizing_distributed_data_loader_with_state_bos_bestfit(tok, B, T, split, tokenizer_batch_size=TBS,
                                                                    buffer_size=BUF, **kw)


def assert_same(got, want):
    assert len(got) == len(want)
    for i, ((x, y, *_), (rx, ry, *_)) in enumerate(zip(got, want)):
        assert torch.equal(x, rx) and torch.equal(y, ry), f"batch {i} differs"


def train_files(data_dir):
    return sorted(os.path.join(data_dir, n) for n in os.listdir(data_dir))[:-1]


# -----------------------------------------------------------------------------


def test_batches_match_the_reference_packer_across_epochs(data_dir):
    tok = TinyTokenizer()
    got = take(make(tok), 40)  # into the 2nd epoch of the 89 training documents
    assert_same(got, reference_batches(train_files(data_dir), TinyTokenizer(), 40))
    bos = tok.get_bos_token_id()
    for x, y, state in got:
        assert x.shape == (B, T) and x.dtype == torch.int64
        assert (x[:, 0] == bos).all()  # every row starts at a document start
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert got[-1][2]["epoch"] == 2  # wrapped around the training files
    assert len(json.dumps(got[-1][2])) < 2000


def test_resume_reproduces_the_uninterrupted_batches_exactly(data_dir):
    tok = TinyTokenizer()
    full = take(make(tok), 40)
    for k in (1, 6, 23, 31):  # 23 and 31 lie past the first epoch boundary
        resumed = take(make(tok, resume_state_dict=full[k - 1][2]), 40 - k)
        assert_same(resumed, full[k:])
        assert resumed[-1][2] == full[-1][2]


def test_prefetch_thread_changes_nothing(data_dir):
    tok = TinyTokenizer()
    plain = take(make(tok), 30)
    threaded = make(tok, prefetch=3)
    assert_same(take(threaded, 30), plain)
    resumed = make(tok, prefetch=2, resume_state_dict=plain[11][2])
    assert_same(take(resumed, 18), plain[12:])
    threaded.close()
    resumed.close()


def test_non_state_variant_yields_the_same_batches(data_dir):
    tok = TinyTokenizer()
    with_state = take(make(tok, split="val"), 5)
    plain = tokenizing_distributed_data_loader_bos_bestfit(tok, B, T, "val", tokenizer_batch_size=TBS, buffer_size=BUF,
                                                           device="cpu", prefetch=0)
    got = [(x.clone(), y.clone()) for x, y in (next(plain) for _ in range(5))]
    assert_same(got, with_state)
    val_file = sorted(os.listdir(data_dir))[-1:]
    assert_same(got, reference_batches([os.path.join(data_dir, val_file[0])], tok, 5))


def test_ranks_take_interleaved_row_groups_and_resume_exactly(data_dir, monkeypatch):
    tok = TinyTokenizer()
    files = train_files(data_dir)
    per_rank = {}
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        per_rank[rank] = take(make(tok), 20)
        assert_same(per_rank[rank], reference_batches(files, TinyTokenizer(), 20, rank=rank, world_size=2))
        assert per_rank[rank][-1][2]["rank"] == rank
    assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0])
    # A gathered checkpoint state lets every rank resume exactly.
    gathered = {"epoch": 1, "pq_idx": 0, "rg_idx": 0, "ranks": [per_rank[0][9][2], per_rank[1][9][2]]}
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        assert_same(take(make(tok, resume_state_dict=gathered), 10), per_rank[rank][10:])


def test_gather_loader_states_is_identity_in_one_process():
    state = {"epoch": 1, "pq_idx": 0, "rg_idx": 0}
    assert gather_loader_states(state) is state


def test_foreign_or_upstream_state_falls_back_to_the_next_row_group_round(data_dir, monkeypatch, caplog):
    tok = TinyTokenizer()
    files = train_files(data_dir)
    # Upstream's state: resume at row group (rg // W + 1) * W + rank of file pq_idx, empty buffer.
    got = take(make(tok, resume_state_dict={"pq_idx": 0, "rg_idx": 0, "epoch": 1}), 6)
    assert_same(got, reference_batches(files, TinyTokenizer(), 6, start_rg=1))
    assert "approximately" in caplog.text
    # Our state saved by rank 0, loaded by rank 1 of 2: rank 1 cannot rebuild rank 0's buffer.
    rank0_state = take(make(tok), 1)[0][2]
    assert rank0_state["pq_idx"] == 0
    as_rank(monkeypatch, 1, 2)
    got = take(make(tok, resume_state_dict=rank0_state), 4)
    start_rg = (rank0_state["rg_idx"] // 2 + 1) * 2 + 1
    assert_same(got, reference_batches(files, TinyTokenizer(), 4, rank=1, world_size=2, start_rg=start_rg))


def test_resume_fails_loudly_when_a_shard_changed(data_dir):
    tok = TinyTokenizer()
    state = take(make(tok), 3)[-1][2]
    write_shards(data_dir, seed=1)  # same layout, different text
    with pytest.raises(ResumeError, match="changed since the checkpoint was saved"):
        make(tok, resume_state_dict=state)
    with pytest.raises(ResumeError, match="'train' split, not 'val'"):
        make(tok, split="val", resume_state_dict=state)


def test_cuda_devices_are_recognised_for_pinned_memory():
    # Upstream compared torch.device("cuda:0") == "cuda", which is always False: memory was never pinned.
    assert dataloader._uses_cuda(torch.device("cuda", 0))
    assert dataloader._uses_cuda(torch.device("cuda", 3))
    assert dataloader._uses_cuda("cuda:1") and dataloader._uses_cuda("cuda")
    assert not dataloader._uses_cuda(torch.device("cpu")) and not dataloader._uses_cuda("mps")


def test_cpu_loader_does_not_pin_or_start_threads(data_dir):
    loader = make(TinyTokenizer(), prefetch=None)
    next(loader)
    assert not loader.use_cuda and not loader.cpu_buffer.is_pinned()
    assert loader.device_buffer is loader.cpu_buffer  # no second copy on CPU
    assert not any(t.name == "nanochat-dataloader" for t in threading.enumerate())


def test_default_tokenizer_threads_leave_cpu_cores_to_training(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert dataloader.default_tokenizer_threads("cpu") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert dataloader.default_tokenizer_threads("cpu") == 4
    assert dataloader.default_tokenizer_threads(torch.device("cuda", 0)) == 4


def test_tokenizer_threads_are_passed_through(data_dir, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    tok = TinyTokenizer()
    next(make(tok))
    assert set(tok.calls) == {1}
    tok = TinyTokenizer()
    next(make(tok, tokenizer_threads=3))
    assert set(tok.calls) == {3}


def test_prefetch_thread_stops_with_the_loader_and_forwards_errors(data_dir):
    def alive():
        return [t for t in threading.enumerate() if t.name == "nanochat-dataloader"]

    loader = make(TinyTokenizer(), prefetch=2)
    next(loader)
    assert alive()
    threads = alive()
    del loader
    gc.collect()
    for t in threads:
        t.join(timeout=5)
    assert not alive()

    closed = make(TinyTokenizer(), prefetch=2)
    next(closed)
    closed.close()
    with pytest.raises(RuntimeError, match="the data loader was closed"):
        next(closed)

    failing = make(TinyTokenizer(fail_after=2), prefetch=2)
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        for _ in range(50):
            next(failing)
    failing.close()


@pytest.mark.gpu
def test_cuda_loader_pins_and_copies_the_same_batches(data_dir):
    tok = TinyTokenizer()
    cpu = take(make(tok), 8)
    loader = make(tok, device="cuda", prefetch=2)
    assert loader.cpu_buffer.is_pinned()
    got = [(x.cpu(), y.cpu()) for x, y, _ in (next(loader) for _ in range(8))]
    assert_same(got, cpu)
    loader.close()


def test_bad_input_gives_clear_errors(data_dir, tmp_path, monkeypatch):
    tok = TinyTokenizer()
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        make(tok, split="test")
    with pytest.raises(DatasetError, match="no pretraining shards"):
        make(tok, data_dir=str(tmp_path / "empty"))
    one = tmp_path / "one"
    write_shards(str(one), num_files=1)
    with pytest.raises(DatasetError, match="only one shard"):
        make(tok, data_dir=str(one))
    as_rank(monkeypatch, 5, 6)  # 2 train files of 1 row group each, 6 ranks: rank 5 gets nothing
    few = tmp_path / "few"
    write_shards(str(few), num_files=3, row_groups=1)
    with pytest.raises(DatasetError, match="fewer row groups than ranks"):
        next(make(tok, data_dir=str(few)))
