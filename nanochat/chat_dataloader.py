"""
The conversation loader for midtraining and SFT: task conversations -> rendered token ids -> (B, T) rows
packed by best-fit with BOS padding, with a resume state that reproduces the uninterrupted run exactly.
Tests: tests/test_chat_dataloader.py.

    loader = packed_conversation_loader(task, tokenizer, 8, 2048, mask_mode="assistant", device=device)
    inputs, targets, state = next(loader)          # (B, T) int64; targets -1 = not trained on
    progress, last_step = training_progress(state, num_iterations=-1)   # -1 = one epoch
"""

import collections
import logging

import numpy as np
import torch

from nanochat.common import get_dist_info
from nanochat.dataloader import BestFitBuffer, ResumeError, gather_loader_states, loader_device
from nanochat.training import batch_views

logger = logging.getLogger(__name__)

STATE_FORMAT = "chat-bestfit-1"  # bump when the meaning of the state fields changes
MASK_MODES = ("all", "assistant")
TRUNCATION_LOG_EVERY = 1000  # after the first one, log a truncation summary every this many

__all__ = ["ConversationLoader", "packed_conversation_loader", "training_progress", "gather_loader_states",
           "ResumeError", "STATE_FORMAT", "MASK_MODES"]


# A buffered conversation: dataset index, rendered length before the cut to a row, ids, target flags.
_Rendered = collections.namedtuple("_Rendered", "index length ids keep")


class ConversationLoader:
    """Endless iterator of (inputs, targets, state_dict) for midtraining ("all") and SFT ("assistant"): (B, T)
    int64 on `device`, fresh each batch; targets -1 where not trained on (padding; in "assistant" mode every token
    the assistant does not produce). resume_state_dict (one it yielded, or gather_loader_states of every rank's):
    the next batches equal the uninterrupted run's; another world size, rank or dataset size raises ResumeError."""

    def __init__(self, task, tokenizer, B, T, mask_mode="all", device=None, buffer_size=100,
                 resume_state_dict=None, split=None, max_tokens=2048):
        self.device = loader_device(device, B=B, T=T, buffer_size=buffer_size, max_tokens=max_tokens)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        self.use_cuda = self.device.type == "cuda"
        self.B, self.T, self.mask_mode, self.buffer_size = B, T, mask_mode, buffer_size
        self.split, self.max_tokens = split, max_tokens
        _, self.rank, _, self.world_size = get_dist_info()
        self._task, self._tokenizer = task, tokenizer
        self._bos = tokenizer.get_bos_token_id()
        self._cap = T + 1  # row capacity: T inputs plus the one-token shift for the targets
        self.dataset_size = len(task)
        if self.dataset_size < self.world_size:
            where = f" ({split} split)" if split else ""
            raise ValueError(f"the dataset{where} has {self.dataset_size} conversations, fewer than the "
                             f"{self.world_size} ranks reading it; use more data or fewer processes")

        # `consumed` is rank-strided like the cursor (rank, +W per placed conversation): consumed / dataset_size
        # is, on every rank, the fraction of the epoch all ranks together have trained on.
        self.cursor, self.epoch, self.consumed = self.rank, 1, self.rank
        self.batches, self.truncated = 0, 0
        self._buffer = BestFitBuffer()  # _Rendered, by their length after the cut to a row
        if resume_state_dict is not None:
            self._restore(resume_state_dict)

    def _render(self, index):
        ids, mask = self._tokenizer.render_conversation(self._task[index], max_tokens=self.max_tokens)
        length = len(ids)
        ids = np.asarray(ids[:self._cap], dtype=np.int64)
        keep = np.ones(len(ids), dtype=np.bool_) if self.mask_mode == "all" else np.asarray(mask[:self._cap], dtype=np.bool_)
        return _Rendered(index, length, ids, keep)

    def _fetch(self):
        item = self._render(self.cursor)
        # Cut to the row and counted: a longer conversation could never be placed, and a buffer full of them
        # would leave every later row empty.
        if item.length > self._cap:
            self.truncated += 1
            if self.truncated == 1 or self.truncated % TRUNCATION_LOG_EVERY == 0:
                logger.warning("%d conversation(s) so far on rank %d were longer than a row (%d tokens) and were "
                               "truncated to it (latest: #%d, %d tokens); a larger --max-seq-len keeps them whole",
                               self.truncated, self.rank, self._cap, item.index, item.length)
        self._buffer.add(item, len(item.ids))
        self.cursor += self.world_size  # rank r reads r, r+W, ...: the ranks together read the data in order
        if self.cursor >= self.dataset_size:
            self.cursor -= self.dataset_size  # keeps the rank interleaving going across the epoch boundary
            self.epoch += 1

    def state_dict(self):
        """This rank's position after the last batch it returned (JSON-serialisable)."""
        return {"format": STATE_FORMAT, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "cursor": self.cursor, "epoch": self.epoch, "consumed": self.consumed,
                "dataset_size": self.dataset_size, "batches": self.batches, "truncated": self.truncated,
                # Whole rendered conversations: re-rendering these rebuilds the buffer exactly (lengths checked).
                "buffer": [item.index for item in self._buffer],
                "buffer_lengths": [item.length for item in self._buffer],
                # A change of these only warns: same data order, different packing.
                "B": self.B, "T": self.T, "buffer_size": self.buffer_size, "mask_mode": self.mask_mode,
                "max_tokens": self.max_tokens}

    def _restore(self, state):
        W, rank = self.world_size, self.rank
        if "ranks" in state:  # every rank's state, from gather_loader_states
            states = state["ranks"]
            if len(states) != W:
                raise ResumeError(f"the chat loader state was saved by {len(states)} ranks and this run has {W}; "
                                  f"relaunch with {len(states)} processes to resume this checkpoint")
            state = states[rank]
        if state.get("format") != STATE_FORMAT:
            raise ResumeError(f"the loader state has format {state.get('format')!r}, not {STATE_FORMAT!r}: it is "
                              f"not a chat loader state from this version (a pretraining loader state?)")
        if state["world_size"] != W:
            raise ResumeError(f"the chat loader state was saved with world size {state['world_size']} and this run "
                              f"has {W}; relaunch with {state['world_size']} processes to resume this checkpoint")
        if state["rank"] != rank:
            raise ResumeError(f"the chat loader state is rank {state['rank']}'s and this is rank {rank}; save every "
                              f"rank's state (gather_loader_states) to resume a multi-process run")
        if self.split is not None and state.get("split") not in (None, self.split):
            raise ResumeError(f"the chat loader state is for the {state['split']!r} split, not {self.split!r}")
        if state["dataset_size"] != self.dataset_size:
            raise ResumeError(f"the chat loader state is for a dataset of {state['dataset_size']} conversations and "
                              f"this one has {self.dataset_size}: resume with the data mixture the run started with")
        settings = ("B", "T", "buffer_size", "mask_mode", "max_tokens")
        changed = [f"{k} {state[k]!r} -> {getattr(self, k)!r}" for k in settings if state.get(k) != getattr(self, k)]
        if changed:
            logger.warning("Chat loader settings changed since the checkpoint (%s): the data order continues "
                           "where it stopped, but the batches differ from the uninterrupted run's", ", ".join(changed))
        self.cursor, self.epoch, self.consumed = state["cursor"], state["epoch"], state["consumed"]
        self.batches, self.truncated = state["batches"], state["truncated"]
        for index, length in zip(state["buffer"], state["buffer_lengths"], strict=True):
            item = self._render(index)
            if item.length != length:
                raise ResumeError(f"conversation #{index} now renders to {item.length} tokens, the checkpoint saw "
                                  f"{length}: the dataset or the tokenizer changed since the checkpoint was saved")
            self._buffer.add(item, len(item.ids))
        logger.info("Chat loader resumed%s on rank %d: %d buffered conversations re-rendered, cursor %d, epoch %d",
                    "" if changed else " exactly", self.rank, len(self._buffer), self.cursor, self.epoch)

    def __iter__(self):
        return self

    def _pack(self):
        """(ids, keep) as (B, T+1) arrays: BOS-padded rows, keep = the token is trained on as a target."""
        # Conversations are never split, so every row starts with BOS; no mask between the conversations of a row.
        cap = self._cap
        ids = np.full((self.B, cap), self._bos, dtype=np.int64)
        keep = np.zeros((self.B, cap), dtype=np.bool_)  # padding is never a target
        for r in range(self.B):
            pos = 0
            while pos < cap:
                while len(self._buffer) < self.buffer_size:
                    self._fetch()
                if self._buffer.shortest() > cap - pos:
                    break  # nothing fits: the rest of the row stays padding (conversations are never cropped)
                item, _ = self._buffer.pop(cap - pos)  # the longest that fits, the earliest on ties
                n = len(item.ids)
                ids[r, pos:pos + n] = item.ids
                keep[r, pos:pos + n] = item.keep
                pos += n
                self.consumed += self.world_size
            if pos == 0:  # cannot happen: every buffered conversation is at most a row long
                raise RuntimeError("the chat loader packed a row with no conversation in it")
        return ids, keep

    def __next__(self):
        ids, keep = self._pack()  # (B, T+1) each
        rows = np.empty((2, self.B, self.T), dtype=np.int64)  # [inputs | targets]: one copy to the device
        rows[0] = ids[:, :-1]
        # Target j is token j+1: it is trained on when token j+1 is (a real token in "all" mode, an
        # assistant-produced token in "assistant" mode); padding and masked tokens become -1.
        rows[1] = np.where(keep[:, 1:], ids[:, 1:], -1)
        self.batches += 1
        flat = torch.from_numpy(rows.reshape(-1))
        # On CUDA pinned memory makes the copy asynchronous; the caching host allocator keeps the pinned
        # block alive until the copy is done, so a fresh tensor per batch is safe.
        flat = flat.pin_memory().to(self.device, non_blocking=True) if self.use_cuda else flat.to(self.device)
        inputs, targets = batch_views(flat, self.B, self.T)  # the layout the batch probe compiles
        return inputs, targets, self.state_dict()


packed_conversation_loader = ConversationLoader


def training_progress(state, num_iterations, batches_per_step=1):
    """(progress in [0, 1], last_step) of one rank's loader state over num_iterations steps of `batches_per_step`
    batches (-1: one epoch). Ranks may reach the end one batch apart: the training loop all-reduces last_step."""
    if num_iterations > 0:
        done, horizon = state["batches"], num_iterations * batches_per_step
    else:
        done, horizon = state["consumed"], state["dataset_size"]
    return min(1.0, done / horizon), done >= horizon
