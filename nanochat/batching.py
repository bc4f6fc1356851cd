"""
Continuous batching: concurrent generation requests on one model share one forward pass per step.

    request = BatchScheduler(model, tokenizer, max_batch=16).submit(prompt_ids, max_tokens=64, seed=1)
    for column in request:  # one token per sample, as the batch makes it; then request.finish_reasons
        ...
"""

import atexit
import collections
import logging
import queue
import threading
import weakref

import torch

from nanochat.engine import DecodeBatch, Generation, generation_budget

logger = logging.getLogger(__name__)

END = object()  # delivered after a request's last column
_WORKING = weakref.WeakSet()  # schedulers whose worker thread was started, closed at interpreter exit


def _close_at_exit():
    # A daemon worker still inside a torch op while the interpreter shuts down can abort the process ("terminate
    # called without an active exception"): end each after its current step, before the interpreter goes.
    for scheduler in list(_WORKING):
        scheduler.close()


class Request(Generation):
    """One submitted generation. Iterate it for its columns (one token per sample per step) when it was submitted
    without a `deliver` callback; cancel() stops it, and its rows leave the batch before the next step.
    finish_reasons as a Generation's; error: the exception that ended it, if one did."""

    def __init__(self, scheduler, deliver, *args):
        self._queue = queue.SimpleQueue() if deliver is None else None
        super().__init__(*args, deliver=self._queue.put if deliver is None else deliver)
        self.error, self.done, self._scheduler, self._cancelled = None, threading.Event(), scheduler, False

    def cancel(self):
        """Stop generating; the scheduler frees the rows before its next step. Safe from any thread, and twice."""
        if not self.done.is_set():
            self._cancelled = True
            with self._scheduler._cond:  # an idle worker wakes to drop the rows
                self._scheduler._cond.notify()

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


class BatchScheduler(DecodeBatch):
    """The engine's decode loop (DecodeBatch) of at most `max_batch` rows (a request takes num_samples; a wider one
    runs alone) on a worker thread (worker=False: the caller runs step()). Requests join first come, first served,
    between two steps, and a seeded one gets the tokens Engine.generate gives it alone (a big model's batched matmuls
    and masked attention round unlike one row's, which can flip a near-tie: 99.4% equal in bench_batch_step).
    tokenizer None = raw token streams; a row holds at most context_len tokens (default the model's sequence_len),
    prompt included."""

    def __init__(self, model, tokenizer=None, max_batch=16, context_len=None, worker=True):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        super().__init__(model, tokenizer, context_len)
        self.max_batch, self._pending, self._cond = max_batch, collections.deque(), threading.Condition()
        self._thread, self._worker, self._closed = None, worker, False

    # -- the caller's side (any thread) ----------------------------------------------

    def submit(self, tokens, max_tokens=None, temperature=1.0, top_k=None, top_p=1.0, seed=42, num_samples=1,
               stop_tokens=None, deliver=None):
        """Queue a request; returns its Request. Arguments as Engine.generate, plus top_p (1.0 = off) and stop_tokens
        (None = engine.stop_tokens(tokenizer)). deliver: called on the scheduler's thread with each column, then END
        (or the exception that ended the request); None = iterate the Request instead."""
        budget = generation_budget(tokens, num_samples, max_tokens, temperature, top_p, self.context_len, True)
        stops = self.stop_tokens if stop_tokens is None else frozenset(stop_tokens)
        request = Request(self, deliver, list(tokens), num_samples, budget, temperature, top_k, top_p, seed, stops)
        with self._cond:
            if self._closed:
                raise RuntimeError("this scheduler is closed")
            self._pending.append(request)
            if self._thread is None and self._worker:
                atexit.unregister(_close_at_exit)  # registered on first use, not at import, and only once
                atexit.register(_close_at_exit)
                _WORKING.add(self)
                self._thread = threading.Thread(target=self._run, name="nanochat-batch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return request

    def stats(self):
        """What the batch holds now: {"max_batch", "active_rows", "running_requests", "queued_requests"}."""
        return {"max_batch": self.max_batch, "active_rows": len(self.rows), "running_requests": len(self.running),
                "queued_requests": len(self._pending)}

    def close(self):
        """Stop the worker thread after its current step; requests still there end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._fail_all(RuntimeError("the batch scheduler was closed"))

    # -- the scheduler's side (one thread) ---------------------------------------------

    def _run(self):
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self.rows:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - handed to every request in the batch, which raise it
                logger.exception("a batch step failed; ending its %d requests with the error", len(self.running))
                self._fail_all(e, pending=False)

    @torch.inference_mode()
    def step(self):
        """Drop cancelled requests; one decode step for the batch; then admit the waiting requests that fit. Returns
        the number of rows left in the batch."""
        for req in self.running:
            if req._cancelled:
                self._end(req, "cancelled")
        self.drop_ended()
        # Each column goes out as it is drawn (Generation.deliver): the stepped requests' before any prefill, and
        # an admitted one's first before the next one's prefill, so a first token need not wait for the others'.
        stepped = super().step() if self.rows else []
        for req in stepped + self._admissions():
            if req.column is None and not req.finished:  # admitted just now
                try:
                    self.admit(req)
                except Exception as e:  # noqa: BLE001 - this prompt's failure is this request's, not the batch's
                    logger.exception("prefill of a %d-token prompt failed", len(req.tokens))
                    self._end(req, None, error=e)
                    self.drop_ended()
                    continue
            if req.finished:
                self._end(req, None)
        return len(self.rows)

    def _admissions(self):
        """The waiting requests whose rows fit, first come first served (the cancelled ones end here)."""
        chosen, rows = [], len(self.rows)
        with self._cond:
            while self._pending:
                req = self._pending[0]
                if not req._cancelled and rows and rows + req.num_samples > self.max_batch:
                    break
                self._pending.popleft()
                if req._cancelled:
                    self._end(req, "cancelled")
                    continue
                chosen.append(req)
                rows += req.num_samples
        # Doubling (up to max_batch) reallocates a few times as the load grows, not at every admission.
        if rows > self.cache.capacity:
            self.cache.reserve(max(rows, min(self.max_batch, 2 * self.cache.capacity)))
        return chosen

    def _end(self, req, reason, error=None):
        """End a request: samples still going get `reason`, the caller gets END (or the error)."""
        req.finish(reason)
        req.error = error
        req.done.set()
        req.deliver(END if error is None else error)

    def _fail_all(self, error, pending=True):
        """End the running requests (and the waiting ones, if `pending`) with `error`; start an empty batch."""
        waiting = []
        if pending:
            with self._cond:
                waiting, self._pending = list(self._pending), collections.deque()
        for req in self.running + waiting:
            self._end(req, None, error=error)
        self.rows, self.running, self.cache = [], [], self.new_cache(0, self.context_len)
