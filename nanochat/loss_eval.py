"""
Bits per byte: the tokenizer-independent loss used to compare models with different vocabularies.

    from nanochat.loss_eval import evaluate_bpb
    bpb = evaluate_bpb(model, val_loader, steps, get_token_bytes(device))

Run by scripts/base_train.py (validation) and scripts/base_eval.py (train and val splits).
"""

import logging
import math

import torch
import torch.distributed as dist

from nanochat.common import dist_world_size

log = logging.getLogger("nanochat.loss_eval")


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Bits per byte of `model` over `steps` batches: sum of nats / (ln 2 * sum of target bytes).

    model(x, y, loss_reduction='none') must return the per-token cross-entropy in nats (B*T values).
    batches: an iterator of (x, y) (extra items, e.g. a loader state, are ignored).
    token_bytes: int tensor [vocab] with the byte length of every token id, 0 for special tokens.
    Targets that are ignored (y < 0) or special (0 bytes) count in neither sum, so BOS targets and
    masked positions do not move the number. Under torch.distributed the sums are added over ranks
    and every rank returns the same value. Returns inf when no target had any bytes.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = token_bytes.device
    # float64 accumulators: ~20M tokens of per-batch sums lose digits in fp32. MPS has no float64.
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        try:
            batch = next(batch_iter)
        except StopIteration:
            raise ValueError(f"the batches ran out before {steps} steps") from None
        x, y = batch[0], batch[1]
        loss = model(x, y, loss_reduction="none").reshape(-1)  # (B*T,) nats
        y = y.reshape(-1).to(device)
        valid = y >= 0
        # token_bytes[-1] would silently read the last vocab entry, so ignored ids are looked up as 0.
        num_bytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))], 0)
        counted = num_bytes > 0
        # where() rather than a multiply: a masked position's loss may be inf/nan and must not leak in.
        total_nats += torch.where(counted, loss.to(device, acc_dtype), 0).sum()
        total_bytes += num_bytes.sum(dtype=torch.int64)
    if dist_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nats, num_bytes = total_nats.item(), total_bytes.item()
    if num_bytes == 0:
        return float("inf")
    return nats / (math.log(2) * num_bytes)


def evaluate_splits_bpb(model, tokenizer, device, batch_size, seq_len, steps, splits=("train", "val")):
    """Bits per byte over `steps` packed batches of each split ({split: bpb}); base_eval and base_loss share it."""
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.tokenizer import get_token_bytes

    token_bytes = get_token_bytes(device=device)
    out = {}
    for split in splits:
        loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, batch_size, seq_len, split=split, device=device)
        out[split] = evaluate_bpb(model, loader, steps, token_bytes)
        log.info("%s bpb: %.6f", split, out[split])
    return out
