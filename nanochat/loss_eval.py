"""
Bits per byte: the tokenizer-independent loss that compares models with different vocabularies.

    bpb = evaluate_bpb(model, val_loader, steps, get_token_bytes(device))   # tests: tests/test_loss_eval.py
"""

import logging
import math

import torch
import torch.distributed as dist

from nanochat.common import dist_world_size

log = logging.getLogger("nanochat.loss_eval")


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Bits per byte of `model` over `steps` batches: sum of nats / (ln 2 * sum of target bytes), summed over
    ranks; inf when no target had any bytes. model(x, y, loss_reduction='none') -> (B*T,) nats; batches yield
    (x, y, ...); token_bytes: int [vocab], 0 for special tokens. Targets < 0 or special count in neither sum."""
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
    """{split: bits per byte over `steps` packed batches of it}."""
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.tokenizer import get_token_bytes

    token_bytes = get_token_bytes(device=device)
    out = {}
    for split in splits:
        loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, batch_size, seq_len, split=split, device=device)
        out[split] = evaluate_bpb(model, loader, steps, token_bytes)
        log.info("%s bpb: %.6f", split, out[split])
    return out
