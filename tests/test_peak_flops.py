"""Tests of the peak FLOPs / bandwidth tables in nanochat/common.py: real torch.cuda.get_device_name()
strings map to their own card's entry, no entry is reached through another card's name, and unknown
cards are None with one warning.

    python -m pytest tests/test_peak_flops.py -q
"""

import logging

import pytest

from nanochat import common
from nanochat.common import _PEAK_BANDWIDTH, _PEAK_FLOPS, _model_key, get_peak_bandwidth, get_peak_flops

# (device name as torch.cuda.get_device_name() reports it, model key, dense bf16 TFLOP/s)
REAL_NAMES = [
    ("NVIDIA H100 80GB HBM3", "h100", 989),
    ("NVIDIA H100 PCIe", "h100 pcie", 756),
    ("NVIDIA H100 NVL", "h100 nvl", 835),
    ("NVIDIA H200", "h200", 989),
    ("NVIDIA H200 NVL", "h200 nvl", 835),
    ("NVIDIA GH200 480GB", "gh200", 989),
    ("NVIDIA B200", "b200", 2250),
    ("NVIDIA GB200", "gb200", 2500),
    ("NVIDIA A100-SXM4-80GB", "a100 sxm", 312),
    ("NVIDIA A100-SXM4-40GB", "a100 sxm", 312),
    ("NVIDIA A100-PCIE-40GB", "a100 pcie", 312),
    ("NVIDIA A100 80GB PCIe", "a100 pcie", 312),
    ("NVIDIA A40", "a40", 149.7),
    ("NVIDIA A30", "a30", 165),
    ("NVIDIA A10", "a10", 125),
    ("NVIDIA A10G", "a10g", 70),
    ("NVIDIA L4", "l4", 121),
    ("NVIDIA L40", "l40", 181),
    ("NVIDIA L40S", "l40s", 362),
    ("NVIDIA RTX A2000", "rtx a2000", 31.9),
    ("NVIDIA RTX A4000", "rtx a4000", 76.7),
    ("NVIDIA RTX A4500", "rtx a4500", 94.6),
    ("NVIDIA RTX A5000", "rtx a5000", 111.1),
    ("NVIDIA RTX A6000", "rtx a6000", 154.8),
    ("NVIDIA RTX 6000 Ada Generation", "rtx 6000 ada", 364.2),
    ("NVIDIA GeForce RTX 3060", "rtx 3060", 25.5),
    ("NVIDIA GeForce RTX 3060 Ti", "rtx 3060 ti", 32.4),
    ("NVIDIA GeForce RTX 3070", "rtx 3070", 40.6),
    ("NVIDIA GeForce RTX 3070 Ti", "rtx 3070 ti", 43.5),
    ("NVIDIA GeForce RTX 3080", "rtx 3080", 59.5),
    ("NVIDIA GeForce RTX 3080 Ti", "rtx 3080 ti", 68.2),
    ("NVIDIA GeForce RTX 3090", "rtx 3090", 71.2),
    ("NVIDIA GeForce RTX 3090 Ti", "rtx 3090 ti", 80.0),
    ("NVIDIA GeForce RTX 4060", "rtx 4060", 30.2),
    ("NVIDIA GeForce RTX 4060 Ti", "rtx 4060 ti", 44.1),
    ("NVIDIA GeForce RTX 4070", "rtx 4070", 58.3),
    ("NVIDIA GeForce RTX 4070 SUPER", "rtx 4070 super", 71.0),
    ("NVIDIA GeForce RTX 4070 Ti", "rtx 4070 ti", 80.2),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", "rtx 4070 ti super", 88.2),
    ("NVIDIA GeForce RTX 4080", "rtx 4080", 97.5),
    ("NVIDIA GeForce RTX 4080 SUPER", "rtx 4080 super", 104.4),
    ("NVIDIA GeForce RTX 4090", "rtx 4090", 165.2),
    ("NVIDIA GeForce RTX 5060", "rtx 5060", 38.4),
    ("NVIDIA GeForce RTX 5060 Ti", "rtx 5060 ti", 47.4),
    ("NVIDIA GeForce RTX 5070", "rtx 5070", 61.7),
    ("NVIDIA GeForce RTX 5070 Ti", "rtx 5070 ti", 87.9),
    ("NVIDIA GeForce RTX 5080", "rtx 5080", 112.6),
    ("NVIDIA GeForce RTX 5090", "rtx 5090", 209.5),
    ("Tesla V100-SXM2-16GB", "v100 sxm", 125),
    ("Tesla V100-PCIE-32GB", "v100 pcie", 112),
    ("Tesla T4", "t4", 65),
    ("AMD Instinct MI300X", "mi300x", 1307.4),
    ("AMD Instinct MI300X VF", "mi300x", 1307.4),
    ("AMD Instinct MI250X", "mi250x", 383),
]

UNKNOWN_NAMES = [
    "NVIDIA GeForce RTX 4070 Laptop GPU",  # a laptop part: lower clocks, not the desktop card's number
    "NVIDIA RTX A4000 Laptop GPU",
    "Quadro RTX 6000",  # Turing, not the RTX 6000 Ada
    "NVIDIA RTX PRO 6000 Blackwell Server Edition",
    "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a MIG slice has a fraction of the card
    "NVIDIA GeForce GTX 1080 Ti",
    "NVIDIA TITAN RTX",
    "",
]


@pytest.mark.parametrize("name,key,tflops", REAL_NAMES)
def test_real_device_names_map_to_their_own_entry(name, key, tflops):
    assert _model_key(name) == key
    assert get_peak_flops(name) == pytest.approx(tflops * 1e12)


def test_every_card_in_the_list_has_its_own_value_where_they_differ():
    # Cards that substring matching used to confuse, pairwise: each gets its own number.
    confusable = [("NVIDIA A40", "NVIDIA RTX A4000"), ("NVIDIA L4", "NVIDIA L40"), ("NVIDIA L40", "NVIDIA L40S"),
                  ("NVIDIA A10", "NVIDIA A100-SXM4-80GB"), ("NVIDIA A10", "NVIDIA A10G"),
                  ("NVIDIA GeForce RTX 4070", "NVIDIA GeForce RTX 4070 Ti SUPER"),
                  ("NVIDIA GeForce RTX 4070 Ti", "NVIDIA GeForce RTX 4070 Ti SUPER"),
                  ("NVIDIA GeForce RTX 3060", "NVIDIA GeForce RTX 3060 Ti"), ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"),
                  ("NVIDIA RTX A6000", "NVIDIA RTX 6000 Ada Generation"), ("NVIDIA B200", "NVIDIA GB200")]
    for a, b in confusable:
        assert get_peak_flops(a) != get_peak_flops(b), (a, b)


@pytest.mark.parametrize("table", [_PEAK_FLOPS, _PEAK_BANDWIDTH], ids=["flops", "bandwidth"])
def test_no_entry_is_reachable_only_through_another_entrys_name(table):
    for key, value in table.items():
        # The key is its own model identity, and the names a card reports with it resolve to it.
        assert _model_key(key) == key, f"table key {key!r} is not in normalised form"
        for name in (f"NVIDIA {key}", f"NVIDIA GeForce {key.upper()}", f"AMD Instinct {key}"):
            assert _lookup_key(name, table) == key
        # Extending a key by a word never falls back to it: "rtx 4070 laptop" is not the 4070.
        for extra in ("ti", "super", "laptop", "x", "mobile"):
            longer = f"{key} {extra}"
            assert _lookup_key(longer, table) == (longer if longer in table else None), longer
        # Neither does a prefix of it.
        words = key.split()
        for cut in range(1, len(words)):
            prefix = " ".join(words[:cut])
            assert _lookup_key(prefix, table) == (prefix if prefix in table else None), prefix
        # Nor a key with a character added or removed ("a10" vs "a100", "l4" vs "l40").
        for other in (key + "0", key[:-1]):
            if _model_key(other) != other:  # "h100 sxm0" folds back to "h100 sxm" (SXM2/4/5 are one form factor)
                continue
            assert _lookup_key(other, table) == (other if other in table else None), other
        assert value > 0


def _lookup_key(name, table):
    """The table entry a name resolves to, or None."""
    key = _model_key(name)
    return key if key in table else None


@pytest.mark.parametrize("name", UNKNOWN_NAMES)
def test_unknown_cards_are_none(name):
    assert get_peak_flops(name) is None
    assert get_peak_bandwidth(name) is None


def test_unknown_card_warns_once_naming_it(monkeypatch, caplog):
    monkeypatch.setattr(common, "_warned_unknown", set())
    with caplog.at_level(logging.WARNING, logger="nanochat.common"):
        assert get_peak_flops("NVIDIA Imaginary X9") is None
        assert get_peak_flops("NVIDIA Imaginary X9") is None
    records = [r.getMessage() for r in caplog.records if r.name == "nanochat.common"]
    assert len(records) == 1 and "NVIDIA Imaginary X9" in records[0] and "n/a" in records[0]


def test_bandwidth_uses_the_same_exact_matching():
    assert get_peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert get_peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert get_peak_bandwidth("NVIDIA RTX A4000") == 448e9  # not the A40's
    assert get_peak_bandwidth("NVIDIA GeForce RTX 4070 Ti SUPER") == 672e9  # not the 4070's


def test_measuring_the_matmul_rate_leaves_the_global_generator_alone():
    # start_run measures between seeding and init_weights(): a draw from the global generator there would
    # shift every initialisation away from the one its seed gives everywhere else (upstream included).
    import torch

    torch.manual_seed(42)
    expected = torch.rand(4)
    torch.manual_seed(42)
    common.measure_matmul_flops(torch.device("cpu"), torch.float32, n=64, seconds=0.01)
    assert torch.equal(torch.rand(4), expected)


def test_the_matmul_rate_is_the_fastest_product_so_a_moment_of_load_does_not_lower_it(monkeypatch):
    # runcpu.sh's SFT stage logged an MFU of 150%: its probe ran while a test suite loaded the machine.
    import torch

    times = iter([0.0, 0.0, 0.1, 0.1, 0.5, 0.5, 0.6, 0.9, 1.0])  # products of 0.1, 0.4 (under load), 0.1, 0.1 s
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(times))
    rate = common.measure_matmul_flops(torch.device("cpu"), torch.float32, n=64, seconds=0.8)
    assert rate == pytest.approx(2 * 64**3 / 0.1)
