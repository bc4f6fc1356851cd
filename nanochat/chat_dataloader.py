"""
The conversation loader for midtraining and SFT: task conversations -> rendered token ids -> (B, T)
rows packed by BOS-aligned best-fit with padding, with a resume state that reproduces the
uninterrupted run exactly.

    from nanochat.chat_dataloader import packed_conversation_loader, training_progress
    loader = packed_conversation_loader(task, tokenizer, 8, 2048, mask_mode="assistant", device=device)
    inputs, targets, state = next(loader)          # (B, T) int64; targets -1 = not trained on
    progress, last_step = training_progress(state, num_iterations=-1)   # -1 = one epoch
    ...
    loader = packed_conversation_loader(task, tokenizer, 8, 2048, mask_mode="assistant", device=device,
                                        resume_state_dict=state)
    # the next batches are bit-for-bit the ones the first loader would have produced

Pipeline (per rank r of W):
1. Conversations: rank r reads dataset indices r, r+W, r+2W, ... of the task (a Task or TaskMixture,
   already shuffled); past the end the index wraps around (modulo the dataset size) and the epoch
   counter goes up, so together the ranks read the dataset in order and never the same conversation
   in one pass.
2. Tokens: each conversation goes through `tokenizer.render_conversation` (ids and the assistant
   mask). One longer than a row (T+1 tokens) is truncated to the row and counted: such a conversation
   could never be placed otherwise, and a buffer full of them would leave every later row empty.
3. Packing: a buffer of `buffer_size` rendered conversations; each row of T+1 tokens takes, again and
   again, the longest buffered conversation that fits the space left (the earliest one on ties), and
   when none fits the rest of the row is BOS padding whose targets are -1. Conversations are never
   split, so every row starts with BOS. There is no attention mask between the conversations of a
   row: plain causal attention over the whole row.
4. Targets: mask_mode "all" (midtraining) trains on every real token; "assistant" (SFT) only on the
   tokens the assistant produces (render mask 1), the mask shifted by one to line up with targets.
"""

import logging

import numpy as np
import torch

from nanochat.common import get_dist_info
from nanochat.dataloader import BestFitBuffer, ResumeError, gather_loader_states
from nanochat.training import batch_views

logger = logging.getLogger(__name__)

STATE_FORMAT = "chat-bestfit-1"  # bump when the meaning of the state fields changes
MASK_MODES = ("all", "assistant")
TRUNCATION_LOG_EVERY = 1000  # after the first one, log a truncation summary every this many

__all__ = ["ConversationLoader", "packed_conversation_loader", "training_progress", "gather_loader_states",
           "ResumeError", "STATE_FORMAT", "MASK_MODES"]


class _Rendered:
    """A buffered conversation: its dataset index, its rendered length before truncation to the row,
    and the (possibly truncated) ids and target flags."""

    __slots__ = ("index", "length", "ids", "keep")

    def __init__(self, index, length, ids, keep):
        self.index, self.length, self.ids, self.keep = index, length, ids, keep


class ConversationLoader:
    """Iterator of (inputs, targets, state) batches; see the module docstring and
    `packed_conversation_loader`."""

    def __init__(self, task, tokenizer, B, T, mask_mode="all", device=None, buffer_size=100,
                 resume_state_dict=None, split=None, max_tokens=2048):
        for name, value in (("B", B), ("T", T), ("buffer_size", buffer_size), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
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

        # Where the next fetch reads, and the counters that progress and logs are built from. `consumed`
        # is rank-strided like the cursor (starts at rank, +W per placed conversation), so on every rank
        # consumed / dataset_size estimates the fraction of the epoch all ranks together have trained on.
        self.cursor, self.epoch, self.consumed = self.rank, 1, self.rank
        self.batches, self.truncated = 0, 0
        self._buffer = BestFitBuffer()  # _Rendered, by their length after the cut to a row
        if resume_state_dict is not None:
            self._restore(resume_state_dict)

    # -- rendering and fetching

    def _render(self, index):
        ids, mask = self._tokenizer.render_conversation(self._task[index], max_tokens=self.max_tokens)
        length = len(ids)
        ids = np.asarray(ids[:self._cap], dtype=np.int64)
        if self.mask_mode == "all":
            keep = np.ones(len(ids), dtype=np.bool_)
        else:
            keep = np.asarray(mask[:self._cap], dtype=np.bool_)
        return _Rendered(index, length, ids, keep)

    def _fetch(self):
        """Render the conversation at the cursor into the buffer and advance the cursor."""
        item = self._render(self.cursor)
        if item.length > self._cap:
            self.truncated += 1
            if self.truncated == 1 or self.truncated % TRUNCATION_LOG_EVERY == 0:
                logger.warning("%d conversation(s) so far on rank %d were longer than a row (%d tokens) and were "
                               "truncated to it (latest: #%d, %d tokens); a larger --max-seq-len keeps them whole",
                               self.truncated, self.rank, self._cap, item.index, item.length)
        self._buffer.add(item, len(item.ids))
        self.cursor += self.world_size
        if self.cursor >= self.dataset_size:
            self.cursor -= self.dataset_size  # keeps the rank interleaving going across the epoch boundary
            self.epoch += 1

    # -- resume

    def state_dict(self):
        """Where this loader stands after the last batch it returned (JSON-serialisable; see the
        factory's docstring for the fields)."""
        return {"format": STATE_FORMAT, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "cursor": self.cursor, "epoch": self.epoch, "consumed": self.consumed,
                "dataset_size": self.dataset_size, "batches": self.batches, "truncated": self.truncated,
                "buffer": [item.index for item in self._buffer],
                "buffer_lengths": [item.length for item in self._buffer],
                "B": self.B, "T": self.T, "buffer_size": self.buffer_size, "mask_mode": self.mask_mode,
                "max_tokens": self.max_tokens}

    def _select_rank_state(self, state):
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
        return state

    def _restore(self, state):
        state = self._select_rank_state(state)
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

    # -- iteration

    def __iter__(self):
        return self

    def _pack(self):
        """(ids, keep) as (B, T+1) arrays: BOS-padded rows, keep = the token is trained on as a target."""
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
                item, _ = self._buffer.pop(cap - pos)
                n = len(item.ids)
                ids[r, pos:pos + n] = item.ids
                keep[r, pos:pos + n] = item.keep
                pos += n
                self.consumed += self.world_size
            if pos == 0:  # cannot happen: every buffered conversation is at most a row long
                raise RuntimeError("the chat loader packed a row with no conversation in it")
        return ids, keep

    def _to_device(self, array):
        tensor = torch.from_numpy(array)
        if self.use_cuda:
            # Pinned memory makes the copy asynchronous; the caching host allocator keeps the pinned
            # block alive until the copy is done, so a fresh tensor per batch is safe.
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def __next__(self):
        ids, keep = self._pack()  # (B, T+1) each
        rows = np.empty((2, self.B, self.T), dtype=np.int64)  # [inputs | targets]: one copy to the device
        rows[0] = ids[:, :-1]
        # Target j is token j+1: it is trained on when token j+1 is (a real token in "all" mode, an
        # assistant-produced token in "assistant" mode); padding and masked tokens become -1.
        rows[1] = np.where(keep[:, 1:], ids[:, 1:], -1)
        self.batches += 1
        inputs, targets = batch_views(self._to_device(rows.reshape(-1)), self.B, self.T)  # the layout the batch probe compiles
        return inputs, targets, self.state_dict()


def packed_conversation_loader(task, tokenizer, B, T, mask_mode="all", device=None, buffer_size=100,
                               resume_state_dict=None, split=None, max_tokens=2048):
    """Endless iterator of (inputs, targets, state_dict) for midtraining ("all") and SFT ("assistant").

    task: `len(task)` and `task[i]` -> conversation dict (a tasks.common.Task or TaskMixture).
    tokenizer: `.render_conversation(conversation, max_tokens=...)` -> (ids, mask) and `.get_bos_token_id()`;
    `max_tokens` is the renderer's own cap (2048, as the chat format defines it).
    inputs/targets: (B, T) int64 on `device`, fresh tensors each batch; targets are the inputs shifted by
    one, with -1 where nothing is trained on (padding; in "assistant" mode also every token the assistant
    does not produce). On CUDA the host tensors are pinned and the copy is asynchronous.
    Ranks (RANK/WORLD_SIZE from torchrun) read interleaved conversations. The `split` name is only
    recorded in the state and checked on resume.

    Exact resume. The state describes the loader after the batch it came with:
      cursor, epoch          the next dataset index this rank renders, and the pass over the data it is in,
      consumed               rank + world_size * (conversations this rank has placed into rows),
      dataset_size           len(task), checked on resume,
      batches                batches yielded so far,
      truncated              conversations longer than a row so far (truncated to T+1 tokens),
      buffer, buffer_lengths the buffered conversations' dataset indices in buffer order, and their
                             rendered lengths (checked on resume),
      format, split, rank, world_size   for validation; B, T, buffer_size, mask_mode, max_tokens
                             (a change only logs a warning: same data order, different packing).
    The buffer holds whole rendered conversations, so re-rendering its indices rebuilds it exactly and
    the next batches equal the uninterrupted run's. Each rank has its own state: pass
    `gather_loader_states(state)` (a collective) to the checkpoint. A state from another world size or
    rank, or for a dataset of another size, raises ResumeError.
    """
    return ConversationLoader(task, tokenizer, B, T, mask_mode=mask_mode, device=device, buffer_size=buffer_size,
                              resume_state_dict=resume_state_dict, split=split, max_tokens=max_tokens)


def training_progress(state, num_iterations, batches_per_step=1):
    """(progress in [0, 1], last_step) of one rank's loader state.

    num_iterations > 0: a fixed horizon of that many optimizer steps of `batches_per_step` batches each
    (gradient accumulation); last_step once that many batches have been yielded. Otherwise (-1) one epoch:
    progress = consumed / dataset_size and last_step once consumed reaches dataset_size. The training
    loop all-reduces last_step across ranks, since ranks may reach the end one batch apart.
    """
    if num_iterations > 0:
        done, horizon = state["batches"], num_iterations * batches_per_step
    else:
        done, horizon = state["consumed"], state["dataset_size"]
    return min(1.0, done / horizon), done >= horizon
