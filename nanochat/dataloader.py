"""
The pretraining data loader: parquet shards -> documents tokenized with BOS first -> (B, T) rows packed by
best-fit with cropping, with a resume state that reproduces the uninterrupted run exactly.
Tests: tests/test_dataloader.py; throughput: `python -m bench.bench_dataloader --help`.

    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, 8, 2048, "train", device=device)
    inputs, targets, state = next(loader)   # (B, T) int64 views; `state` goes into the checkpoint meta
"""

import base64
import bisect
import collections
import logging
import queue
import threading
import weakref
import zlib

import numpy as np
import torch
import torch.distributed as dist

from nanochat.common import UserError, dist_world_size, get_dist_info, usable_cores
from nanochat.dataset import DatasetError, split_files
from nanochat.training import batch_views

log = logging.getLogger(__name__)

STATE_FORMAT = "bestfit-exact-2"  # bump when the meaning of the state fields changes
_REF_FIELDS = 4  # a buffered document is referenced as (pq_idx, rg_idx, row, token count incl. BOS)


class ResumeError(UserError, RuntimeError):
    """A loader state cannot be restored against the shards and tokenizer present now."""


def default_tokenizer_threads(device):
    """Encoder threads: 4 next to a GPU; on CPU at most half the usable cores (and at most 4)."""
    if _uses_cuda(device):
        return 4
    # More encoder threads than spare cores only add context switches (a 2-core run spent half its time in the kernel).
    return max(1, min(4, usable_cores() // 2))


def _uses_cuda(device):
    # The device *type*: upstream compared a torch.device to "cuda", always False, so it never pinned memory.
    return torch.device(device).type == "cuda"


def loader_device(device, **sizes):
    """Both loaders' argument check: every size a positive int; the device (None = cuda when available)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


# Up to tokenizer_batch_size documents of one row group, and where they came from.
_TextBatch = collections.namedtuple("_TextBatch", "texts rows epoch pq_idx rg_idx next_row")


def _read_texts(parquet_file, rg_idx):
    return parquet_file.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()


def strides_documents(num_row_groups, world_size):
    """True when the ranks split a file of `num_row_groups` by documents rather than by row groups."""
    return num_row_groups < world_size


def _first_row_group(num_row_groups, rank, world_size):
    return 0 if strides_documents(num_row_groups, world_size) else rank


def _owned_rows(pf, rg_idx, num_rows, start_row, rank, world_size):
    if not strides_documents(pf.num_row_groups, world_size):
        return range(start_row, num_rows)
    # Fewer row groups than ranks (a small val shard, the last train shard) would leave some ranks with nothing,
    # so each rank takes the documents whose index in the file is = rank mod W: disjoint, near-equal shares.
    offset = sum(pf.metadata.row_group(g).num_rows for g in range(rg_idx))  # the group's first row in the file
    first = start_row + (rank - offset - start_row) % world_size  # the first row whose file index is = rank mod W
    return range(first, num_rows, world_size)


def _document_batches(files, rank, world_size, cursor, tokenizer_batch_size, split):
    """Endless stream of _TextBatch for this rank from `cursor` = (epoch, pq_idx, rg_idx, row); epoch + 1 per pass."""
    import pyarrow.parquet as pq

    epoch, start_pq, start_rg, start_row = cursor
    first_pass = True
    while True:
        produced = False
        for pq_idx in range(start_pq if first_pass else 0, len(files)):
            pf = pq.ParquetFile(files[pq_idx])
            resume_here = first_pass and pq_idx == start_pq
            rg_idx = start_rg if resume_here else _first_row_group(pf.num_row_groups, rank, world_size)
            # Rank r reads whole row groups r, r+W, ...: each rank decompresses only its own share.
            rg_step = 1 if strides_documents(pf.num_row_groups, world_size) else world_size
            while rg_idx < pf.num_row_groups:
                texts = _read_texts(pf, rg_idx)
                row = start_row if (resume_here and rg_idx == start_rg) else 0
                owned = _owned_rows(pf, rg_idx, len(texts), row, rank, world_size)
                for i in range(0, len(owned), tokenizer_batch_size):
                    chunk = owned[i:i + tokenizer_batch_size]
                    rows = [j for j in chunk if texts[j] is not None]  # null texts are skipped
                    produced = produced or bool(rows)
                    yield _TextBatch([texts[j] for j in rows], rows, epoch, pq_idx, rg_idx, chunk[-1] + 1)
                rg_idx += rg_step
        if not first_pass and not produced:
            raise DatasetError(f"rank {rank} of {world_size} got no documents from the {split} split ({len(files)} "
                               f"file(s)): it holds fewer documents than there are ranks, or none at all; "
                               f"add data or launch fewer processes")
        first_pass = False
        epoch += 1


def _as_doc(tokens, cap):
    # Only a row's worth (T+1 tokens) can ever be placed; the true length stays in the ref for the best-fit choice.
    return np.array(tokens if len(tokens) <= cap else tokens[:cap], dtype=np.int32)


def _tokenized_batches(text_batches, tokenizer, bos, threads, cap):
    for batch in text_batches:
        token_lists = tokenizer.encode(batch.texts, prepend=bos, num_threads=threads) if batch.texts else []
        docs = [([batch.pq_idx, batch.rg_idx, row, len(tokens)], _as_doc(tokens, cap))
                for row, tokens in zip(batch.rows, token_lists)]
        yield batch, docs


class _Prefetcher:
    """Runs an iterator in a daemon thread, up to `depth` items ahead, in order; errors re-raise in the consumer."""

    def __init__(self, source, depth):
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(source, self._queue, self._stop),
                                        name="nanochat-dataloader", daemon=True)
        self._thread.start()

    @staticmethod
    def _work(source, q, stop):
        # A staticmethod: a thread holding the loader would keep it from garbage collection, and run forever.
        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in source:
                if not put((True, item)):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put((False, e))

    def __next__(self):
        while True:
            if self._stop.is_set():
                raise RuntimeError("the data loader was closed (or failed earlier); build a new one to read more batches")
            try:
                ok, payload = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                continue
        if not ok:
            self._stop.set()  # the worker has exited; a later next() must not wait for it
            raise payload
        return payload

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


class BestFitBuffer:
    """The document pool of both best-fit packers, with O(log n) queries. Picks what a linear scan in arrival
    order would (ties go to the earliest arrival), as the reference packer in tests/test_dataloader.py does."""

    def __init__(self):
        self._docs = {}  # seq -> document; dicts keep insertion order, i.e. arrival order
        self._by_len = {}  # length -> deque of seq, oldest first
        self._lengths = []  # sorted distinct lengths present
        self._seq = 0

    def __len__(self):
        return len(self._docs)

    def __iter__(self):
        return iter(self._docs.values())  # arrival order

    def add(self, doc, n):
        self._docs[self._seq] = doc
        same = self._by_len.get(n)
        if same is None:
            same = self._by_len[n] = collections.deque()
            bisect.insort(self._lengths, n)
        same.append(self._seq)
        self._seq += 1

    def shortest(self):
        return self._lengths[0]

    def pop(self, remaining):
        """(doc, fits): the largest document of length <= remaining, else the shortest one."""
        i = bisect.bisect_right(self._lengths, remaining) - 1
        fits = i >= 0
        if not fits:
            i = 0
        n = self._lengths[i]
        same = self._by_len[n]
        seq = same.popleft()
        if not same:
            del self._by_len[n]
            del self._lengths[i]
        return self._docs.pop(seq), fits


def _encode_refs(refs):
    # zlib + base64 keeps the checkpoint meta small and readable (refs are mostly consecutive rows).
    arr = np.asarray(refs, dtype="<i8").reshape(-1, _REF_FIELDS)
    return base64.b64encode(zlib.compress(arr.tobytes(), 1)).decode("ascii")


def _decode_refs(text):
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<i8").reshape(-1, _REF_FIELDS).tolist()


class BestFitLoader:
    """Endless iterator of (inputs, targets, state_dict) over the "train" or "val" split: (B, T) int64 views on
    `device`, targets shifted by one, that the next batch overwrites (clone to keep). prefetch: text batches
    tokenized ahead in a thread. resume_state_dict (one it yielded, or gather_loader_states of every rank's): the
    next batches equal the uninterrupted run's; another rank's, world size's or upstream's state resumes
    approximately (a warning); changed shards or tokenizer raise ResumeError."""

    def __init__(self, tokenizer, B, T, split, tokenizer_threads=None, tokenizer_batch_size=128, device=None,
                 resume_state_dict=None, buffer_size=1000, data_dir=None, prefetch=None):
        self.device = loader_device(device, B=B, T=T, tokenizer_batch_size=tokenizer_batch_size, buffer_size=buffer_size)
        self.use_cuda = _uses_cuda(self.device)
        self.B, self.T, self.split, self.buffer_size = B, T, split, buffer_size
        self.tokenizer_threads = tokenizer_threads or default_tokenizer_threads(self.device)
        _, self.rank, _, self.world_size = get_dist_info()
        self._tokenizer = tokenizer
        self._bos = tokenizer.get_bos_token_id()
        self._cap = T + 1  # row capacity: T inputs plus the one-token shift for the targets
        self._files = split_files(split, data_dir, warn_on_legacy=self.rank == 0 and split == "train")

        cursor, refs = self._resume_plan(resume_state_dict)
        self._cursor = cursor  # (epoch, pq_idx, rg_idx, next_row) after the last text batch taken
        self._buffer = BestFitBuffer()  # (ref, tokens) by true length: a document longer than a row never fits
        if refs:
            self._restore_buffer(refs)

        # Allocated once: rows packed in numpy, staged (pinned on CUDA) as [inputs | targets], one copy to the device.
        self._rows = np.empty((B, self._cap), dtype=np.int64)
        rows_t = torch.from_numpy(self._rows)
        self._row_inputs, self._row_targets = rows_t[:, :-1], rows_t[:, 1:]
        self.cpu_buffer = torch.empty(2 * B * T, dtype=torch.int64, pin_memory=self.use_cuda)
        self._cpu_inputs, self._cpu_targets = batch_views(self.cpu_buffer, B, T)
        if self.device.type == "cpu":
            self.device_buffer = self.cpu_buffer
        else:
            self.device_buffer = torch.empty(2 * B * T, dtype=torch.int64, device=self.device)
        self._inputs, self._targets = batch_views(self.device_buffer, B, T)  # the layout the batch probe compiles
        self._copy_done = None  # CUDA event of the last async copy out of the pinned buffer

        source = _tokenized_batches(_document_batches(self._files, self.rank, self.world_size, cursor,
                                                      tokenizer_batch_size, split),
                                    tokenizer, self._bos, self.tokenizer_threads, self._cap)
        if prefetch is None:  # on CUDA tokenizing overlaps the GPU step; on CPU the training step wants every core
            prefetch = 4 if self.use_cuda else 0
        if prefetch > 0:
            self._prefetcher = _Prefetcher(source, prefetch)
            self._next_tokenized = self._prefetcher.__next__
            weakref.finalize(self, self._prefetcher.close)
        else:
            self._prefetcher = None
            self._next_tokenized = source.__next__

    def _resume_plan(self, state):
        """(cursor, buffered refs): exact when the state is ours for this rank, else upstream's approximate rule
        (the next round of row groups, or the next row group in a file split by documents; empty buffer)."""
        rank, W = self.rank, self.world_size
        if state is None:
            return (1, 0, _first_row_group(self._num_row_groups(0), rank, W), 0), []
        if "ranks" in state:
            states = state["ranks"]
            if len(states) == W:
                state = states[rank]
            else:
                log.warning("Loader state was saved by %d ranks, this run has %d: resuming approximately", len(states), W)
                state = states[0]
        if state.get("split", self.split) != self.split:
            raise ResumeError(f"the loader state is for the {state['split']!r} split, not {self.split!r}")
        ours = state.get("format") == STATE_FORMAT
        pq_idx, rg_idx = state["pq_idx"], state["rg_idx"]
        if ours and state["world_size"] == W and state["rank"] == rank:
            cursor = (state["epoch"], pq_idx, rg_idx, state["row_idx"])
            return cursor, _decode_refs(state["buffer"])
        if ours:
            why = (f"it was saved by rank {state['rank']} of {state['world_size']} (this is rank {rank} of {W}); "
                   f"save every rank's state (gather_loader_states) for an exact multi-process resume")
        else:
            why = f"it has format {state.get('format')!r}, not {STATE_FORMAT!r} (an upstream state has none)"
        log.warning("Resuming the data loader approximately: %s. Documents still buffered at save time and the "
                    "rest of the current row-group round are skipped.", why)
        if strides_documents(self._num_row_groups(pq_idx), W):
            next_rg = rg_idx + 1  # every rank visits every row group of this file
        else:
            next_rg = (rg_idx // W + 1) * W + rank
        return (state.get("epoch", 1), pq_idx, next_rg, 0), []

    def _num_row_groups(self, pq_idx):
        import pyarrow.parquet as pq

        if pq_idx >= len(self._files):
            return 0  # past the last file: the stream moves on to the next epoch
        return pq.ParquetFile(self._files[pq_idx]).num_row_groups

    def _restore_buffer(self, refs):
        # The token counts are checked, so a changed shard or tokenizer fails loudly instead of drifting.
        import pyarrow.parquet as pq

        wanted = collections.defaultdict(set)
        for pq_idx, rg_idx, row, _ in refs:
            wanted[(pq_idx, rg_idx)].add(row)
        texts = {}
        open_files = {}
        for (pq_idx, rg_idx), rows in sorted(wanted.items()):
            if pq_idx >= len(self._files):
                raise ResumeError(f"the loader state refers to file #{pq_idx} of the {self.split} split, but there are "
                                  f"only {len(self._files)} now; restore the shards the run started with")
            if pq_idx not in open_files:
                open_files[pq_idx] = pq.ParquetFile(self._files[pq_idx])
            pf = open_files[pq_idx]
            if rg_idx >= pf.num_row_groups:
                raise ResumeError(f"the loader state refers to row group {rg_idx} of {self._files[pq_idx]}, which has "
                                  f"{pf.num_row_groups}; the shard changed since the checkpoint was saved")
            group = _read_texts(pf, rg_idx)
            for row in rows:
                if row >= len(group) or group[row] is None:
                    raise ResumeError(f"document {row} of row group {rg_idx} in {self._files[pq_idx]} is missing; "
                                      f"the shard changed since the checkpoint was saved")
                texts[(pq_idx, rg_idx, row)] = group[row]
        token_lists = self._tokenizer.encode([texts[tuple(r[:3])] for r in refs], prepend=self._bos,
                                             num_threads=self.tokenizer_threads)
        for ref, tokens in zip(refs, token_lists):
            if len(tokens) != ref[3]:
                raise ResumeError(f"document {ref[2]} of row group {ref[1]} in {self._files[ref[0]]} now encodes to "
                                  f"{len(tokens)} tokens, the checkpoint saw {ref[3]}: the shard or the tokenizer "
                                  f"changed since the checkpoint was saved")
            self._buffer.add((list(ref), _as_doc(tokens, self._cap)), ref[3])
        log.info("Data loader resumed exactly: %d buffered documents rebuilt from %d row groups", len(refs), len(wanted))

    def __iter__(self):
        return self

    def _refill(self):
        batch, docs = self._next_tokenized()
        for ref, tokens in docs:
            self._buffer.add((ref, tokens), ref[3])
        self._cursor = (batch.epoch, batch.pq_idx, batch.rg_idx, batch.next_row)

    def state_dict(self):
        """This rank's position after the last batch it returned: JSON-serialisable, about 10 KB."""
        epoch, pq_idx, rg_idx, row_idx = self._cursor
        return {"format": STATE_FORMAT, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "epoch": epoch, "pq_idx": pq_idx, "rg_idx": rg_idx,  # the last text batch taken, as upstream's
                # One past the last row that batch covered. Which rows of a file are this rank's follows from the
                # file's row-group count and world_size alone, so the state needs no field for it.
                "row_idx": row_idx,
                # (pq_idx, rg_idx, row, token count) of every buffered document in arrival order: the buffer holds
                # only whole documents (a crop discards the rest), so re-reading these rebuilds it exactly.
                "buffer": _encode_refs([ref for ref, _ in self._buffer])}

    def __next__(self):
        buf, cap, rows = self._buffer, self._cap, self._rows
        for r in range(self.B):
            row = rows[r]
            pos = 0
            while pos < cap:
                while len(buf) < self.buffer_size:
                    self._refill()
                remaining = cap - pos
                (_, tokens), fits = buf.pop(remaining)  # the largest document that fits, else the shortest
                if fits:
                    row[pos:pos + len(tokens)] = tokens
                    pos += len(tokens)
                else:  # nothing fits: crop the shortest document to the space left, drop its tail
                    row[pos:] = tokens[:remaining]
                    pos = cap
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous async copy may still be reading the pinned buffer
        self._cpu_inputs.copy_(self._row_inputs)
        self._cpu_targets.copy_(self._row_targets)
        if self.device_buffer is not self.cpu_buffer:
            self.device_buffer.copy_(self.cpu_buffer, non_blocking=self.use_cuda)
            if self.use_cuda:
                self._copy_done = torch.cuda.Event()
                self._copy_done.record()
        return self._inputs, self._targets, self.state_dict()

    def close(self):
        """Stop the prefetch thread (also happens when the loader is garbage collected)."""
        if self._prefetcher is not None:
            self._prefetcher.close()


tokenizing_distributed_data_loader_with_state_bos_bestfit = BestFitLoader  # upstream's name


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """The same batches as the state-returning loader, as (inputs, targets) only (val, evals)."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets


def gather_loader_states(state_dict):
    """Every rank's loader state (their packing buffers differ) in one dict for rank 0's checkpoint; a collective."""
    world_size = dist_world_size()
    if world_size == 1:
        return state_dict
    states = [None] * world_size
    dist.all_gather_object(states, state_dict)
    merged = {k: states[0][k] for k in ("epoch", "pq_idx", "rg_idx") if k in states[0]}  # rank 0's, for logs
    merged["ranks"] = states
    return merged
