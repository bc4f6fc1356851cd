"""
Continuous batching: concurrent generation requests on one model share one forward pass per step.

    scheduler = BatchScheduler(model, tokenizer, max_batch=16)
    request = scheduler.submit(prompt_ids, max_tokens=64, temperature=0.8, top_k=50, seed=1)
    for column in request:        # one token per sample, delivered as the batch produces it
        ...
    request.finish_reasons        # per sample: "stop", "length" or "cancelled"
    scheduler.close()

Requests join the running batch between two steps: a new prompt is prefilled on its own (batch 1, exactly
as Engine.generate prefills) and its cache row is copied into the batch's cache. Every step then runs ONE
forward over all rows, each at its own position (BatchCache: the model and the attention honour per-row
lengths), and each request samples its rows with its own settings and its own seeded generator, so a seeded
request gets the tokens it gets alone, the same as Engine.generate gives. A row that ends (a stop token, its
token budget, a full context, a cancel) leaves at once: the batch's last row moves into its slot.

A worker thread runs the steps (started by the first submit); with worker=False the caller runs step().

Tests: python -m pytest tests/test_batching.py -q
"""

import collections
import logging
import queue
import threading

import torch
import torch.nn.functional as F

from nanochat.common import get_compute_dtype
from nanochat.engine import Engine, RowState, last_logits, model_device, sample_next_token

logger = logging.getLogger(__name__)

END = object()  # delivered after a request's last column


def top_p_filter(logits, top_p, temperature):
    """Logits (B, V) with every token outside the nucleus set to -inf: the smallest set of most likely tokens
    whose probability, at this temperature, reaches top_p (the most likely token always stays)."""
    if top_p >= 1.0 or temperature <= 0:
        return logits
    probs = F.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V) each
    # A token stays if the tokens more likely than it do not yet reach top_p.
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    outside[:, 0] = False  # the most likely token stays even when top_p rounds to 0 in float32 (top_p=1e-300)
    mask = torch.zeros_like(outside).scatter(-1, order, outside)
    return logits.masked_fill(mask, float("-inf"))


# -----------------------------------------------------------------------------
# The cache of a running batch


class BatchCache:
    """Keys and values of a running batch whose rows hold different numbers of positions.

    The interface GPT.forward uses (as nanochat.engine.KVCache): get_pos() (None while rows differ), then
    `lengths` (the rows' lengths as a host list, so decoding never reads them back from the device),
    cache_seqlens (B,) int32, get_layer_cache(i) -> (k, v) views (B, T_max, H, D), advance(T), and
    prev_embedding (B, 1, n_embd). Rows 0..B-1 are the live ones: add_rows appends, remove_row moves the last
    row into the freed slot. Storage (n_layers, capacity, T_max, H, D) grows by doubling up to max_rows and is
    released when the batch empties. It starts zeroed: the SDPA path reads (masked) positions past a row's
    length, which must hold finite numbers.
    """

    def __init__(self, max_rows, seq_len, num_layers, num_heads, head_dim, device, dtype):
        self.max_rows, self.max_seq_len, self.n_layers = max_rows, seq_len, num_layers
        self.n_heads, self.head_dim, self.device, self.dtype = num_heads, head_dim, device, dtype
        self.k_cache = self.v_cache = None
        self.lengths = []  # host copy of cache_seqlens: reading the device one would sync every layer
        self.cache_seqlens = torch.zeros(0, dtype=torch.int32, device=device)
        self.prev_embedding = None
        self._pos = 0  # the common length while every row has it, else None

    @property
    def batch_size(self):
        return len(self.lengths)

    @property
    def capacity(self):
        return 0 if self.k_cache is None else self.k_cache.size(1)

    def get_pos(self):
        """The number of positions every row holds, or None when rows differ (see cache_seqlens)."""
        return self._pos

    def get_layer_cache(self, layer_idx):
        n = len(self.lengths)
        return self.k_cache[layer_idx, :n], self.v_cache[layer_idx, :n]

    def advance(self, num_tokens):
        """Every row moved on by `num_tokens` positions (the model calls this after its last layer)."""
        if max(self.lengths, default=0) + num_tokens > self.max_seq_len:
            raise RuntimeError(f"KV cache overflow: {max(self.lengths)} + {num_tokens} positions > capacity {self.max_seq_len}")
        self.lengths = [n + num_tokens for n in self.lengths]
        self.cache_seqlens += num_tokens
        if self._pos is not None:
            self._pos += num_tokens

    def add_rows(self, source, copies=1):
        """Append `copies` rows holding what `source` (a prefilled batch-1 KVCache) holds."""
        n = source.get_pos()
        if source.batch_size != 1 or (source.n_layers, source.n_heads, source.head_dim) != (self.n_layers, self.n_heads, self.head_dim):
            raise ValueError("add_rows takes a batch-1 KVCache of this cache's layers, heads and head_dim")
        if not 0 < n <= self.max_seq_len:
            raise ValueError(f"add_rows needs a prefilled source of 1..{self.max_seq_len} positions, got {n}")
        first = len(self.lengths)
        if first and (source.prev_embedding is None) != (self.prev_embedding is None):
            raise ValueError("every row needs a previous embedding (the smear), or none does")
        self.reserve(first + copies)
        self.k_cache[:, first:first + copies, :n] = source.k_cache[:, :1, :n]  # broadcast over the copies
        self.v_cache[:, first:first + copies, :n] = source.v_cache[:, :1, :n]
        if source.prev_embedding is not None:
            prev = source.prev_embedding.expand(copies, -1, -1)
            self.prev_embedding = prev.clone() if self.prev_embedding is None else torch.cat([self.prev_embedding, prev])
        self._set_lengths(self.lengths + [n] * copies)

    def remove_row(self, row):
        """Drop row `row`; the last row takes its slot (the other rows keep theirs)."""
        last = len(self.lengths) - 1
        lengths = self.lengths[:]
        if row != last:
            n = lengths[last]
            self.k_cache[:, row, :n] = self.k_cache[:, last, :n]
            self.v_cache[:, row, :n] = self.v_cache[:, last, :n]
            lengths[row] = n
        lengths.pop()
        if not lengths:
            self.k_cache = self.v_cache = self.prev_embedding = None  # an idle batch holds no memory
        elif self.prev_embedding is not None:
            keep = list(range(last))
            if row != last:
                keep[row] = last
            self.prev_embedding = self.prev_embedding[keep]
        self._set_lengths(lengths)

    def reserve(self, rows):
        """Make room for `rows` rows: double the storage (at most max_rows, at least `rows`), keeping the live rows."""
        if rows <= self.capacity:
            return
        capacity = max(rows, min(self.max_rows, 2 * self.capacity))
        shape = (self.n_layers, capacity, self.max_seq_len, self.n_heads, self.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self.k_cache is not None:
            b, filled = len(self.lengths), max(self.lengths, default=0)
            k[:, :b, :filled] = self.k_cache[:, :b, :filled]
            v[:, :b, :filled] = self.v_cache[:, :b, :filled]
        self.k_cache, self.v_cache = k, v

    def _set_lengths(self, lengths):
        self.lengths = lengths
        self.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        self._pos = lengths[0] if lengths and all(n == lengths[0] for n in lengths) else (None if lengths else 0)


# -----------------------------------------------------------------------------
# Requests and the scheduler


class Request:
    """One submitted generation. Iterate it for its columns (one token per sample per step) when it was
    submitted without a `deliver` callback; cancel() stops it, and its rows leave the batch before the next step.

    finish_reasons: per sample, None while running, then "stop" (a stop token), "length" (max_tokens or the
    context) or "cancelled". error: the exception that ended it, if one did.
    """

    def __init__(self, scheduler, tokens, num_samples, budget, temperature, top_k, top_p, seed, stop_tokens, deliver):
        self.tokens, self.num_samples, self.budget = tokens, num_samples, budget
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.stop_tokens = stop_tokens
        self.finish_reasons = [None] * num_samples
        self.error = None
        self.done = threading.Event()
        self._scheduler = scheduler
        self._queue = queue.SimpleQueue() if deliver is None else None
        self._deliver = self._queue.put if deliver is None else deliver
        self._cancelled = False
        # Owned by the scheduler's thread once admitted:
        self.rng = None
        self.states = [RowState() for _ in range(num_samples)]
        self.column = None  # the last column delivered: each row's next input token
        self.steps = 0

    def cancel(self):
        """Stop generating; the scheduler frees the rows before its next step. Safe from any thread, and twice."""
        if not self.done.is_set():
            self._cancelled = True
            self._scheduler._wake()

    def __iter__(self):
        """The columns as they come (blocking); leaving the loop early cancels the request."""
        if self._queue is None:
            raise RuntimeError("this request delivers its columns to the callback it was submitted with")
        try:
            while (item := self._queue.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()


class BatchScheduler:
    """A running batch of at most `max_batch` rows (a request takes num_samples rows) over one model.

    tokenizer: for the default stop tokens (<|assistant_end|>, <|bos|>) and the calculator tool, per row as in
    Engine.generate; None = raw token streams. context_len (default the model's sequence_len): a row holds at
    most this many tokens, prompt included; a request that reaches it ends with finish_reason "length".
    Requests are admitted first come, first served, when their rows fit; one with more samples than max_batch
    runs once the batch is empty. worker=False starts no thread: the caller runs step() itself (tests).
    """

    def __init__(self, model, tokenizer=None, max_batch=16, context_len=None, worker=True):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.model = model
        self.engine = Engine(model, tokenizer)  # the prefill cache, the tool state machine, the KV dtype
        self.max_batch = max_batch
        self.context_len = context_len or model.config.sequence_len
        self.device = model_device(model)
        cfg = model.config
        self.cache = BatchCache(max_batch, self.context_len, cfg.n_layer, cfg.n_kv_head, cfg.n_embd // cfg.n_head,
                                self.device, self.engine.kv_dtype or get_compute_dtype()[0])
        special = self.engine.special
        self.default_stops = frozenset() if special is None else frozenset((special["assistant_end"], special["bos"]))
        self.steps = 0  # batched forwards run so far
        self._owners = []  # per batch row: (request, sample index)
        self._running = []  # admitted requests, in admission order
        self._pending = collections.deque()
        self._cond = threading.Condition()
        self._thread = None
        self._worker = worker
        self._closed = False

    # -- the caller's side (any thread) ----------------------------------------------

    def submit(self, tokens, max_tokens=None, temperature=1.0, top_k=None, top_p=1.0, seed=42, num_samples=1,
               stop_tokens=None, deliver=None):
        """Queue a request; returns its Request. Arguments as Engine.generate, plus top_p (1.0 = off) and
        stop_tokens (None = the tokenizer's <|assistant_end|> and <|bos|>). max_tokens None = until the context is
        full. deliver: called on the scheduler's thread with each column, then END (or the exception that ended
        the request); None = iterate the Request instead."""
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError("tokens must be a non-empty list of int token ids")
        if len(tokens) >= self.context_len:
            raise ValueError(f"the prompt ({len(tokens)} tokens) leaves no room in the context of {self.context_len}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
            raise ValueError(f"max_tokens must be None or an int >= 0, got {max_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        budget = self.context_len - len(tokens) if max_tokens is None else max_tokens
        stops = self.default_stops if stop_tokens is None else frozenset(stop_tokens)
        request = Request(self, list(tokens), num_samples, budget, temperature, top_k, top_p, seed, stops, deliver)
        with self._cond:
            if self._closed:
                raise RuntimeError("this scheduler is closed")
            self._pending.append(request)
            if self._thread is None and self._worker:
                self._thread = threading.Thread(target=self._run, name="nanochat-batch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return request

    def stats(self):
        """What the batch holds now: {"max_batch", "active_rows", "running_requests", "queued_requests"}."""
        return {"max_batch": self.max_batch, "active_rows": len(self._owners), "running_requests": len(self._running),
                "queued_requests": len(self._pending)}

    def close(self):
        """Stop the worker thread after its current step; requests still there end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._fail_all(RuntimeError("the batch scheduler was closed"))

    def _wake(self):
        with self._cond:
            self._cond.notify()

    # -- the scheduler's side (one thread) ---------------------------------------------

    def _run(self):
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self._owners:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - handed to every request in the batch, which raise it
                logger.exception("a batch step failed; ending its %d requests with the error", len(self._running))
                self._fail_all(e, pending=False)

    @torch.inference_mode()
    def step(self):
        """One round: drop cancelled requests; ONE forward for every row in the batch, a column sampled and
        delivered for every request in it; then the waiting requests that fit, each prefilled and given its
        first column at once. Rows that ended leave. Returns the number of rows left in the batch."""
        self._drop_cancelled()
        if self._owners:
            work = []  # (request, its logits (rows, V), the sample index of each row)
            ids = torch.tensor([[req.column[s]] for req, s in self._owners], dtype=torch.long, device=self.device)
            logits = last_logits(self.model, ids, self.cache)  # (B, 1) in, (B, V) out
            self.steps += 1
            rows_of = collections.defaultdict(list)
            for row, (req, s) in enumerate(self._owners):
                rows_of[req].append((s, row))
            for req in self._running:
                pairs = sorted(rows_of[req])  # sample order: how Engine.generate feeds the generator
                rows = [row for _, row in pairs]
                picked = logits[rows[0]:rows[0] + 1] if len(rows) == 1 else logits[torch.tensor(rows, device=self.device)]
                work.append((req, picked, [s for s, _ in pairs]))
            self._sample_and_deliver(work)
        for req, logits in self._admit():
            # Every sample draws its own first token from the prompt's logits (as Engine.generate does).
            self._sample_and_deliver([(req, logits.expand(req.num_samples, -1), list(range(req.num_samples)))])
        return len(self._owners)

    def _admit(self):
        """Prefill the waiting requests whose rows fit, first come first served, one by one: yields (request,
        its prompt's last logits (1, V)) after each, so its first token need not wait for the others' prefill."""
        chosen, rows = [], len(self._owners)
        with self._cond:
            while self._pending:
                req = self._pending[0]
                if not req._cancelled and rows and rows + req.num_samples > self.max_batch:
                    break
                self._pending.popleft()
                if req._cancelled:
                    self._finish(req, "cancelled")
                    continue
                chosen.append(req)
                rows += req.num_samples
        self.cache.reserve(rows)
        for req in chosen:
            try:
                logits = self._prefill(req)
            except Exception as e:  # noqa: BLE001 - this prompt's failure is this request's, not the batch's
                logger.exception("prefill of a %d-token prompt failed", len(req.tokens))
                self._finish(req, None, error=e)
                continue
            yield req, logits

    def _prefill(self, req):
        req.rng = torch.Generator(device=self.device)
        req.rng.manual_seed(req.seed)
        cache = self.engine.new_cache(1, len(req.tokens), self.device)
        ids = torch.tensor([req.tokens], dtype=torch.long, device=self.device)  # (1, T)
        logits = last_logits(self.model, ids, cache)  # (1, V)
        self.cache.add_rows(cache, req.num_samples)
        self._owners.extend((req, s) for s in range(req.num_samples))
        self._running.append(req)
        return logits

    def _sample_and_deliver(self, work):
        drawn = []
        for req, logits, _ in work:
            if req.top_p < 1.0 and req.temperature > 0:
                logits = top_p_filter(logits, req.top_p, req.temperature)
            drawn.append(sample_next_token(logits, req.rng, req.temperature, req.top_k))  # (rows, 1)
        sampled = torch.cat(drawn)[:, 0].tolist()  # one host sync for the whole batch
        i = 0
        for req, _, samples in work:
            # An ended sample repeats its stop token, as in Engine.generate; a forced token (the calculator's
            # output) replaces the sample drawn for its row, which still drew one to keep the generator in step.
            column = [state.terminal for state in req.states]
            for s in samples:
                state = req.states[s]
                token = state.forced.popleft() if state.forced else sampled[i]
                i += 1
                column[s] = token
                if token in req.stop_tokens:
                    state.terminal = token
                    req.finish_reasons[s] = "stop"
                elif self.engine.special is not None:
                    self.engine.track_tool_call(state, token)
            req.column, req.steps = column, req.steps + 1
            req._deliver(column)
            ended = all(state.terminal is not None for state in req.states)
            if ended or req.steps >= req.budget or len(req.tokens) + req.steps >= self.context_len:
                self._finish(req, "length")
        self._remove_rows([row for row, (req, s) in enumerate(self._owners)
                           if req.done.is_set() or req.states[s].terminal is not None])

    def _drop_cancelled(self):
        for req in [r for r in self._running if r._cancelled]:
            self._finish(req, "cancelled")
        self._remove_rows([row for row, (req, _) in enumerate(self._owners) if req.done.is_set()])

    def _remove_rows(self, rows):
        # Highest first: the row moved into a freed slot is then never one that is leaving too.
        for row in sorted(rows, reverse=True):
            self.cache.remove_row(row)
            self._owners[row] = self._owners[-1]
            self._owners.pop()

    def _finish(self, req, reason, error=None):
        """End a request: samples still going get `reason`, the caller gets END (or the error)."""
        req.finish_reasons = [r if r is not None else reason for r in req.finish_reasons]
        req.error = error
        if req in self._running:
            self._running.remove(req)
        req.done.set()
        req._deliver(END if error is None else error)

    def _fail_all(self, error, pending=True):
        """End the running requests (and the waiting ones, if `pending`) with `error`; start an empty batch."""
        waiting = []
        if pending:
            with self._cond:
                waiting, self._pending = list(self._pending), collections.deque()
        for req in self._running[:] + waiting:
            self._finish(req, None, error=error)
        self._owners = []
        self.cache = BatchCache(self.cache.max_rows, self.cache.max_seq_len, self.cache.n_layers, self.cache.n_heads,
                                self.cache.head_dim, self.device, self.cache.dtype)
