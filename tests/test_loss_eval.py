"""Bits per byte (nanochat/loss_eval.py) against hand-computed values from a fake model with known
probabilities (fp32 losses, so 1e-6): special and ignored targets excluded, nan at masked positions ignored, 2-rank gloo sum."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb

PROBS = [0.1, 0.2, 0.3, 0.4]  # the fake model's next-token distribution at every position
TOKEN_BYTES = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # id 0 plays BOS (a special token, 0 bytes)


class FixedDistributionModel(torch.nn.Module):
    """Predicts PROBS everywhere; optionally returns nan where the target is ignored."""

    def __init__(self, nan_on_ignored=False):
        super().__init__()
        self.nan_on_ignored = nan_on_ignored

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.tensor(PROBS).log().expand(*y.shape, len(PROBS))
        loss = F.cross_entropy(logits.reshape(-1, len(PROBS)), y.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        if self.nan_on_ignored:
            loss = torch.where(y.reshape(-1) < 0, float("nan"), loss)
        return loss


def expected_bpb(targets):
    counted = [t for t in targets if t >= 0 and TOKEN_BYTES[t] > 0]
    nats = sum(-math.log(PROBS[t]) for t in counted)
    return nats / (math.log(2) * sum(int(TOKEN_BYTES[t]) for t in counted))


BATCHES = [
    (torch.zeros(2, 4, dtype=torch.long), torch.tensor([[1, 2, 0, -1], [3, 3, 1, 2]])),
    (torch.zeros(2, 4, dtype=torch.long), torch.tensor([[-1, -1, 3, 0], [2, 1, 1, 1]])),
]


def test_bpb_matches_the_hand_computed_value():
    got = evaluate_bpb(FixedDistributionModel(), iter(BATCHES), 2, TOKEN_BYTES)
    want = expected_bpb([t for _, y in BATCHES for t in y.flatten().tolist()])
    assert got == pytest.approx(want, rel=1e-6)
    # Only the first batch when steps=1; a loader's extra state item is ignored.
    got = evaluate_bpb(FixedDistributionModel(), iter([(x, y, {"state": 1}) for x, y in BATCHES]), 1, TOKEN_BYTES)
    assert got == pytest.approx(expected_bpb(BATCHES[0][1].flatten().tolist()), rel=1e-6)


def test_ignored_targets_do_not_read_the_last_vocab_entry_or_leak_nan():
    # token_bytes[-1] is 3 here: a naive lookup would count 3 bytes for every ignored target.
    y = torch.tensor([[1, -1, -1, -1]])
    got = evaluate_bpb(FixedDistributionModel(nan_on_ignored=True), iter([(torch.zeros_like(y), y)]), 1, TOKEN_BYTES)
    assert got == pytest.approx(-math.log(0.2) / math.log(2), rel=1e-6)


def test_no_bytes_gives_inf_and_short_iterators_are_an_error():
    y = torch.tensor([[0, -1]])
    assert evaluate_bpb(FixedDistributionModel(), iter([(torch.zeros_like(y), y)]), 1, TOKEN_BYTES) == float("inf")
    with pytest.raises(ValueError, match="ran out before 3 steps"):
        evaluate_bpb(FixedDistributionModel(), iter(BATCHES), 3, TOKEN_BYTES)


def _bpb_worker(rank, world_size):
    return evaluate_bpb(FixedDistributionModel(), iter(BATCHES[rank:rank + 1]), 1, TOKEN_BYTES)


@pytest.mark.slow  # spawns two interpreters: ~10 s on 2 busy cores
def test_two_ranks_sum_nats_and_bytes_before_dividing(run_on_ranks):
    results = run_on_ranks(_bpb_worker)
    want = expected_bpb([t for _, y in BATCHES for t in y.flatten().tolist()])
    assert results[0] == pytest.approx(want, rel=1e-6) and results[1] == pytest.approx(want, rel=1e-6)
    # Averaging the per-rank bpb instead would be wrong (the ranks have different byte counts).
    per_rank = [expected_bpb(y.flatten().tolist()) for _, y in BATCHES]
    assert abs(sum(per_rank) / 2 - want) > 1e-3
