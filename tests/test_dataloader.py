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
from nanochat.dataloader import STATE_FORMAT, strides_documents
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
                if pf.num_row_groups < world_size:  # too few row groups: every rank takes every W-th document
                    texts = pf.read(columns=["text"]).column("text").to_pylist()
                    mine = {i for i in range(len(texts)) if i % world_size == rank}
                    start = 0
                    for g in range(pf.num_row_groups):
                        n = pf.metadata.row_group(g).num_rows
                        own = [texts[i] for i in range(start, start + n) if i in mine]
                        for i in range(0, len(own), tbs):
                            yield [x for x in own[i:i + tbs] if x is not None]
                        start += n
                    continue
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
    as_rank(monkeypatch, 5, 6)  # 2 train files of 5 documents each, 6 ranks: rank 5 gets nothing
    few = tmp_path / "few"
    write_shards(str(few), num_files=3, row_groups=1, rows=5)
    with pytest.raises(DatasetError, match="rank 5 of 6 got no documents from the train split.*fewer documents than"):
        next(make(tok, data_dir=str(few)))


# -----------------------------------------------------------------------------
# Any number of ranks: files with fewer row groups than ranks are split by documents

# name -> row-group sizes. With 2 ranks: row groups, documents, row groups, documents (the val shard);
# with 3 ranks: row groups, then documents in the other three.
LAYOUT = {"shard_00000.parquet": [10, 10, 10], "shard_00001.parquet": [25], "shard_00002.parquet": [7, 6],
          "shard_00003.parquet": [11]}
NULL = ("shard_00001.parquet", 4)  # one null row in a file split by documents


class RecordingTokenizer(TinyTokenizer):
    """TinyTokenizer that remembers every text it encoded, in order."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def encode(self, texts, prepend=None, num_threads=8):
        self.seen.extend(texts)
        return super().encode(texts, prepend=prepend, num_threads=num_threads)


@pytest.fixture
def layout_dir(base_dir, monkeypatch):
    """The LAYOUT shards in the base dir's data dir; every document starts with its own unique tag."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    d = base_dir / "base_data_climbmix"
    d.mkdir(parents=True)
    rng = random.Random(0)
    for name, groups in LAYOUT.items():
        texts = [f"{name[6:11]}.{i} {random_doc(rng)}" for i in range(sum(groups))]
        if name == NULL[0]:
            texts[NULL[1]] = None
        with pq.ParquetWriter(d / name, pa.schema([("text", pa.string())])) as w:
            start = 0
            for n in groups:
                w.write_table(pa.table({"text": pa.array(texts[start:start + n], type=pa.string())}))
                start += n
    return d


def split_files(d, split):
    files = sorted(str(p) for p in d.glob("*.parquet"))
    return files[:-1] if split == "train" else files[-1:]


def all_texts(files):
    return [t for f in files for t in pq.read_table(f).column("text").to_pylist() if t is not None]


def first_epoch_share(split, rank, world_size, monkeypatch):
    """The documents one rank reads in its first epoch, in order (the loader runs until its state says epoch 2)."""
    as_rank(monkeypatch, rank, world_size)
    tok = RecordingTokenizer()
    loader = make(tok, split=split)
    while next(loader)[2]["epoch"] == 1:
        pass
    return tok.seen[:tok.seen.index(tok.seen[0], 1)]  # epoch 2 starts where epoch 1 did


# -----------------------------------------------------------------------------
# the striding


def test_the_layout_exercises_both_schemes(layout_dir):
    counts = [pq.ParquetFile(f).num_row_groups for f in split_files(layout_dir, "train") + split_files(layout_dir, "val")]
    assert [strides_documents(n, 2) for n in counts] == [False, True, False, True]
    assert [strides_documents(n, 3) for n in counts] == [False, True, True, True]
    assert not any(strides_documents(n, 1) for n in counts)  # one process reads everything by row groups, as before


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("split", ["train", "val"])
def test_ranks_get_disjoint_shares_that_cover_the_split(layout_dir, monkeypatch, world_size, split):
    shares = [first_epoch_share(split, rank, world_size, monkeypatch) for rank in range(world_size)]
    everything = all_texts(split_files(layout_dir, split))
    assert sorted(t for share in shares for t in share) == sorted(everything)  # complete, and nothing twice
    for rank, share in enumerate(shares):
        assert len(set(share)) == len(share)
    if split == "val":  # one row group of 11 documents: rank r reads documents r, r+W, ... in order
        for rank, share in enumerate(shares):
            assert share == everything[rank::world_size]


@pytest.mark.parametrize("world_size", [2, 3])
def test_strided_batches_match_the_reference_packer(layout_dir, monkeypatch, world_size):
    for split in ("train", "val"):
        for rank in range(world_size):
            as_rank(monkeypatch, rank, world_size)
            got = take(make(TinyTokenizer(), split=split), 12)  # past the first epoch of every share
            want = reference_batches(split_files(layout_dir, split), TinyTokenizer(), 12, rank=rank, world_size=world_size)
            assert_same(got, want)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_resumes_exactly_inside_document_strided_files(layout_dir, monkeypatch, world_size):
    tok = TinyTokenizer()
    n = 24
    files = split_files(layout_dir, "train")
    per_rank = {}
    for rank in range(world_size):
        as_rank(monkeypatch, rank, world_size)
        full = per_rank[rank] = take(make(tok), n)
        assert full[-1][2]["format"] == STATE_FORMAT and full[-1][2]["epoch"] >= 2
        strided = [k for k in range(1, n) if strides_documents(pq.ParquetFile(files[full[k - 1][2]["pq_idx"]]).num_row_groups,
                                                               world_size)]
        assert strided, "no resume point stands in a file split by documents"
        for k in sorted({1, strided[0], strided[-1], n - 3}):
            resumed = take(make(tok, resume_state_dict=full[k - 1][2]), n - k)
            assert_same(resumed, full[k:])
            assert resumed[-1][2] == full[-1][2]
    # The checkpoint's gathered state: every rank picks its own entry.
    k = 9
    gathered = {"epoch": 1, "pq_idx": 0, "rg_idx": 0, "ranks": [per_rank[r][k - 1][2] for r in range(world_size)]}
    for rank in range(world_size):
        as_rank(monkeypatch, rank, world_size)
        assert_same(take(make(tok, resume_state_dict=gathered), n - k), per_rank[rank][k:])


def test_val_split_of_one_row_group_resumes_exactly(layout_dir, monkeypatch):
    tok = TinyTokenizer()
    as_rank(monkeypatch, 1, 3)
    full = take(make(tok, split="val"), 10)
    for k in (1, 4, 7):
        assert_same(take(make(tok, split="val", resume_state_dict=full[k - 1][2]), 10 - k), full[k:])


# -----------------------------------------------------------------------------
# states from before document striding


def _rank1_state_in(layout_dir, monkeypatch, pq_idx):
    as_rank(monkeypatch, 1, 2)
    for _, _, state in take(make(TinyTokenizer()), 30):
        if state["pq_idx"] == pq_idx:
            return state
    raise AssertionError(f"rank 1 never stood in file {pq_idx}")


def test_a_state_of_another_format_resumes_approximately(layout_dir, monkeypatch, caplog):
    # The pre-release format "bestfit-exact-1" is no longer read: nothing writes it, so it is a foreign state.
    tok = TinyTokenizer()
    as_rank(monkeypatch, 1, 2)
    full = take(make(tok), 12)
    k = max(k for k in range(1, 12) if full[k - 1][2]["pq_idx"] == 0)  # file 0 has 3 row groups >= 2 ranks
    next(make(tok, resume_state_dict=dict(full[k - 1][2], format="bestfit-exact-1")))
    assert "Resuming the data loader approximately: it has format 'bestfit-exact-1'" in caplog.text


@pytest.mark.parametrize("kind", ["another format", "upstream"])
def test_a_foreign_state_in_a_document_strided_file_resumes_at_its_next_row_group(layout_dir, monkeypatch, caplog, kind):
    state = _rank1_state_in(layout_dir, monkeypatch, 1)  # file 1: one row group, split by documents for 2 ranks
    state = dict(state, format="bestfit-exact-1") if kind != "upstream" else {k: state[k] for k in ("epoch", "pq_idx", "rg_idx")}
    tok = RecordingTokenizer()
    next(make(tok, resume_state_dict=state))
    assert "Resuming the data loader approximately" in caplog.text
    # The rest of file 1 is skipped: reading restarts with rank 1's first row group of file 2 (2 row groups, 2 ranks).
    file2 = pq.ParquetFile(split_files(layout_dir, "train")[2]).read_row_group(1).column("text").to_pylist()
    assert tok.seen[:len(file2)] == file2


@pytest.mark.parametrize("shards, split", [(0, "train"), (1, "train"), (1, "val"), (2, "test")])
def test_the_loader_and_the_text_iterator_refuse_the_same_shard_dirs(tmp_path, shards, split):
    # Both read their files through dataset.split_files: neither may accept a dir the other refuses.
    from nanochat.dataset import parquets_iter_batched

    d = str(tmp_path / "shards")
    if shards:
        write_shards(d, num_files=shards)
    with pytest.raises((ValueError, DatasetError)) as from_loader:
        make(TinyTokenizer(), split=split, data_dir=d)
    with pytest.raises((ValueError, DatasetError)) as from_iterator:
        next(parquets_iter_batched(split, data_dir=d))
    assert str(from_loader.value) == str(from_iterator.value)


def test_the_best_fit_buffer_of_both_packers_equals_a_linear_scan():
    # Pretraining and chat packing share BestFitBuffer; this pins it to the list rule the spec states:
    # the largest document that fits (earliest on ties), else the shortest (earliest on ties).
    from nanochat.dataloader import BestFitBuffer

    rng = random.Random(0)
    buf, scan = BestFitBuffer(), []
    for step in range(2000):
        if len(scan) < 8 or rng.random() < 0.5:
            doc = (step, rng.randint(1, 20))
            buf.add(doc, doc[1])
            scan.append(doc)
            continue
        remaining = rng.randint(1, 20)
        fitting = [d for d in scan if d[1] <= remaining]
        want = max(fitting, key=lambda d: d[1]) if fitting else min(scan, key=lambda d: d[1])  # first of equals
        assert buf.shortest() == min(d[1] for d in scan)
        assert buf.pop(remaining) == (want, bool(fitting))
        scan.remove(want)
        assert list(buf) == scan  # arrival order, which the loader states save
