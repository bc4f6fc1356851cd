"""The GPU benchmark's plumbing, through its CPU dry run: every part runs (or says why it can't) and lands in
the JSON and the markdown table.

    python -m pytest tests/test_bench_gpu.py -q
"""

import json

import pytest

from bench import bench_gpu
from nanochat import flash_attention as fa


@pytest.mark.usefixtures("one_thread")
def test_dry_run_writes_every_part(tmp_path):
    fa.load_fa3()  # the one-time FA3 load (the bench does it too); then nothing of the loader may change
    saved = fa._fa3, fa._fa3_reason, fa._override_impl
    report = bench_gpu.main(["--dry-run", "--out", str(tmp_path)])
    assert (fa._fa3, fa._fa3_reason, fa._override_impl) == saved  # attention paths are restored
    data = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert data["dry_run"] is True and set(data["results"]) == set(bench_gpu.PARTS)
    for key in ("gpu", "torch", "cuda", "driver", "kernels", "flash_attn_4", "fa3"):
        assert key in data["environment"]
    results = data["results"]
    for name in ("train_d20", "attention", "decode", "recipe_12gb", "train_d12"):
        assert results[name]["status"] == "ok", results[name]
    # FP8 needs CUDA: skipped with the reason, not an error.
    assert results["fp8_d20"]["status"] == "skipped" and "CUDA" in results["fp8_d20"]["reason"]
    d20 = {(r["path"], r["pattern"]): r for r in results["train_d20"]["rows"]}
    assert set(d20) == set(bench_gpu.GRID)
    for key in (("flex", "SSSL"), ("sdpa", "L"), ("sdpa", "SSSL")):
        row = d20[key]
        assert row["status"] == "ok" and row["tok_per_s"] > 0 and row["val_bpb"] > 0, row
    assert d20[("fa3", "L")]["status"] == "skipped"
    # T=64 is shorter than the short window, so SSSL is L here: the same training, to the bit.
    assert d20[("sdpa", "SSSL")]["val_bpb"] == d20[("sdpa", "L")]["val_bpb"]
    assert [r["batch_size"] for r in results["decode"]["sweep"]] == [1, 2]
    assert {r["kernel"] for r in results["attention"]["rows"]} == {"fa3", "flex", "sdpa", "fa4"}
    assert set(data["targets"]) == {"d20_bf16_mfu_percent", "fp8_speedup", "fp8_val_bpb_rel_diff", "sssl_without_fa3_over_l"}
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "| train_d20 | 2 | flex | SSSL |" in table and "Targets:" in table
    assert report["results"].keys() == data["results"].keys()


def test_unknown_part_is_one_line_error():
    with pytest.raises(SystemExit, match="unknown --parts"):
        bench_gpu.main(["--dry-run", "--parts", "train_d20,warp"])
