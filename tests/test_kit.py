"""The shared test kit in tests/conftest.py: what other tests rely on it to be."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from nanochat.common import get_dist_info


def test_byte_tokenizer_is_bytes_plus_the_specials(byte_tokenizer):
    assert byte_tokenizer.get_vocab_size() == 265 and byte_tokenizer.get_bos_token_id() == 256
    assert byte_tokenizer.encode("hé") == list("hé".encode("utf-8"))


def test_tiny_gpt_is_seeded_and_scrambling_makes_logits_decisive(tiny_gpt):
    ids = torch.tensor([[256, 1, 2, 3, 4]])
    fresh, again, scrambled = tiny_gpt(), tiny_gpt(), tiny_gpt(scrambled=True)
    for a, b in zip(fresh.parameters(), again.parameters()):
        assert torch.equal(a, b)
    with torch.no_grad():
        # Zero residual projections and a small lm_head: a fresh model's logits are nearly flat.
        assert scrambled(ids).std() > 10 * fresh(ids).std()
    assert tiny_gpt(seed=1).lm_head.weight.ne(fresh.lm_head.weight).any()


def test_base_dir_is_fresh_and_set(base_dir, tmp_path):
    assert os.environ["NANOCHAT_BASE_DIR"] == str(base_dir) == str(tmp_path / "base")
    assert not base_dir.exists()


def _all_reduce_rank(rank, world_size, offset):
    import nccl_rules

    t = torch.tensor([float(rank + offset)], device="cpu")  # built on the run's device, as NCCL requires
    dist.all_reduce(t)
    try:
        dist.all_reduce(torch.tensor([1.0]))  # built on the host by default: refused on both ranks alike
        refused = False
    except nccl_rules.NcclRuleError:
        refused = True
    return {"sum": t.item(), "dist_info": get_dist_info(), "host_tensor_refused": refused}


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 gave up")
    dist.barrier()  # rank 0 waits here for a peer that is gone


def _sleep_forever(rank, world_size):
    time.sleep(3600)


@pytest.mark.slow  # each case spawns two interpreters
def test_run_on_ranks_returns_each_ranks_result_under_a_torchrun_environment(run_on_ranks):
    expected = [{"sum": 21.0, "dist_info": (True, r, r, 2), "host_tensor_refused": True} for r in range(2)]
    assert run_on_ranks(_all_reduce_rank, 10) == expected


@pytest.mark.slow
def test_run_on_ranks_fails_with_the_failing_ranks_traceback(run_on_ranks):
    with pytest.raises(AssertionError, match="rank 1 raised") as e:
        run_on_ranks(_fail_on_rank_1)
    assert "ValueError: rank 1 gave up" in str(e.value) and "_fail_on_rank_1" in str(e.value)


@pytest.mark.slow
def test_run_on_ranks_kills_ranks_that_outlive_the_timeout(run_on_ranks):
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish within 20 s"):
        run_on_ranks(_sleep_forever, timeout=20)
    assert time.monotonic() - t0 < 40
