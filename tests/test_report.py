"""The training report (nanochat/report.py): section formatting, header, summary, and the upstream bugs
fixed here (SFT section dropped, substring metric matching, bloat counting bytes / split by xargs)."""

import datetime
import logging
import os
import re
import subprocess

import pytest

from nanochat import report
from nanochat.dataset import list_parquet_files, write_shards
from nanochat.loop import _write_curve
from nanochat.report import (DummyReport, extract_metrics, format_header, format_section, format_value,
                             get_report)

T0 = datetime.datetime(2025, 10, 16, 17, 9, 9)

# The environment of the Oct 2025 d20 8xH100 example report.
EXAMPLE_ENV = {
    "git": {"branch": "master", "commit": "4346536", "dirty": True,
            "message": "also allow regenerating assistant message by clicking it, and make sure to feed "},
    "gpu": {"count": 8, "names": ["NVIDIA H100 80GB HBM3"] * 8, "memory_gb": 633.5, "cuda_version": "12.8"},
    "system": {"platform": "Linux", "physical_cores": 104, "logical_cores": 208, "memory_gb": 1771.7,
               "python": "3.10.12", "torch": "2.8.0+cu128"},
    "bloat": {"chars": 350412, "lines": 8542, "files": 43, "tokens": 87603, "deps": 2004},
}

EXAMPLE_HEADER = """\
# nanochat training report

Generated: 2025-10-16 17:09:09

## Environment

### Git Information
- Branch: master
- Commit: 4346536 (dirty)
- Message: also allow regenerating assistant message by clicking it, and make sure to feed 

### Hardware
- Platform: Linux
- CPUs: 104 cores (208 logical)
- Memory: 1771.7 GB
- GPUs: 8x NVIDIA H100 80GB HBM3
- GPU Memory: 633.5 GB total
- CUDA Version: 12.8
- Hourly Rate: $24.00/hour

### Software
- Python: 3.10.12
- PyTorch: 2.8.0+cu128


### Bloat
- Characters: 350,412
- Lines: 8,542
- Files: 43
- Tokens (approx): 87,603
- Dependencies (uv.lock lines): 2,004

Run started: 2025-10-16 17:09:12

---

"""

CHAT_ARGS = {"source": "mid", "task_name": None, "dtype": "bfloat16", "temperature": 0.0, "max_new_tokens": 512,
             "num_samples": 1, "top_k": 50, "batch_size": 8, "model_tag": None, "step": None, "max_problems": None}


class Clock:
    """Stands in for report._now: returns the times it is given, in order."""

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


@pytest.fixture(autouse=True)
def hermetic(base_dir, tmp_path, monkeypatch):
    """Every test: the kit's fresh NANOCHAT_BASE_DIR, rank 0, and tmp_path as the current directory."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)  # generate() copies report.md into the current directory


def at(hms):
    h, m, s = map(int, hms.split(":"))
    return T0.replace(hour=h, minute=m, second=s)


def run_example(monkeypatch, sft_title="Chat SFT"):
    """Reset with the example environment and log a trimmed version of the example run's sections."""
    monkeypatch.setattr(report, "collect_environment", lambda cwd=None: EXAMPLE_ENV)
    monkeypatch.setattr(report, "_now", Clock(T0, at("17:09:12"), at("20:22:26"), at("20:38:25"), at("20:41:11"),
                                              at("20:47:57")))
    r = get_report()
    r.reset()
    r.log("Base model evaluation", [{"Model": "base_model (step 21400)", "CORE metric": 0.1957, "boolq": -0.4816}])
    r.log("Chat evaluation mid", [CHAT_ARGS, {"ARC-Easy": 0.3838, "ARC-Challenge": 0.2952, "MMLU": 0.3165,
                                              "GSM8K": 0.0417, "HumanEval": 0.0854}, {"ChatCORE metric": 0.0909}])
    r.log(sft_title, [{"run": "dummy", "source": "mid"}, {"Training rows": 20843, "Training loss": 1.1076}])
    r.log("Chat evaluation sft", [{**CHAT_ARGS, "source": "sft"}, {"ARC-Easy": 0.3969, "ARC-Challenge": 0.3029,
                                  "MMLU": 0.3159, "GSM8K": 0.0531, "HumanEval": 0.0854}, {"ChatCORE metric": 0.0985}])
    return r


def chat_eval_text(source, when, scores, chatcore):
    args = "".join(f"- {k}: {v}\n" for k, v in {**CHAT_ARGS, "source": source, "temperature": "0.0000"}.items())
    return (f"## Chat evaluation {source}\ntimestamp: 2025-10-16 {when}\n\n{args}"
            + "".join(f"- {k}: {v}\n" for k, v in scores.items()) + f"- ChatCORE metric: {chatcore}\n\n\n")


EXAMPLE_SUMMARY = """\
## Summary

- Characters: 350,412
- Lines: 8,542
- Files: 43
- Tokens (approx): 87,603
- Dependencies (uv.lock lines): 2,004

| Metric          | BASE     | MID      | SFT      | RL       |
|-----------------|----------|----------|----------|----------|
| CORE            | 0.1957   | -        | -        | -        |
| ARC-Challenge   | -        | 0.2952   | 0.3029   | -        |
| ARC-Easy        | -        | 0.3838   | 0.3969   | -        |
| GSM8K           | -        | 0.0417   | 0.0531   | -        |
| HumanEval       | -        | 0.0854   | 0.0854   | -        |
| MMLU            | -        | 0.3165   | 0.3159   | -        |
| ChatCORE        | -        | 0.0909   | 0.0985   | -        |

Total wall clock time: 3h38m
"""


# -----------------------------------------------------------------------------
# formatting


def test_section_formatting_rules():
    data = [
        {"float": 0.0, "neg": -1.0, "big": 2_000_000_000, "edge": 10_000, "small": 9_999, "none": None, "empty": "",
         "flag": True, "text": "a: b", "sci": "3.491758e+09"},
        None, {}, "",
        "### A verbatim block\n\n| a | b |\n",
        {"after": 1},
    ]
    expected = (
        "## Tokenizer training\ntimestamp: 2025-10-16 17:09:09\n\n"
        "- float: 0.0000\n- neg: -1.0000\n- big: 2,000,000,000\n- edge: 10,000\n- small: 9999\n- none: None\n"
        "- empty: \n- flag: True\n- text: a: b\n- sci: 3.491758e+09\n"
        "### A verbatim block\n\n| a | b |\n"
        "- after: 1\n\n"
    )
    assert format_section("Tokenizer training", data, T0) == expected
    with pytest.raises(ValueError, match="would overwrite report.md"):
        get_report().log("Report", [{"a": 1}])
    with pytest.raises(TypeError, match="dicts or strings"):
        format_section("Tokenizer training", [["a list"]], T0)


def test_format_value_edge_cases():
    assert format_value(-12345) == "-12345"  # only large positive ints get separators
    assert format_value(False) == "False"
    assert format_value(1e-5) == "0.0000"


def test_header_matches_the_example_report(monkeypatch, base_dir):
    monkeypatch.setattr(report, "collect_environment", lambda cwd=None: EXAMPLE_ENV)
    monkeypatch.setattr(report, "_now", Clock(T0, at("17:09:12")))
    get_report().reset()
    assert (base_dir / "report" / "header.md").read_text() == EXAMPLE_HEADER


def test_header_gpu_lines_and_hourly_rate():
    no_gpu = format_header({**EXAMPLE_ENV, "gpu": {"count": 0}}, T0)
    assert "- GPUs: None available\n\n### Software" in no_gpu
    assert "GPU Memory" not in no_gpu and "CUDA Version" not in no_gpu and "Hourly Rate" not in no_gpu
    a100 = {"count": 8, "names": ["NVIDIA A100-SXM4-80GB"] * 8, "memory_gb": 634.0, "cuda_version": "12.8"}
    assert "- Hourly Rate: $14.32/hour\n" in format_header({**EXAMPLE_ENV, "gpu": a100}, T0)
    other = {"count": 1, "names": ["NVIDIA GeForce RTX 4070"], "memory_gb": 11.6, "cuda_version": "12.8"}
    assert "- Hourly Rate: $2.00/hour\n" in format_header({**EXAMPLE_ENV, "gpu": other}, T0)


# -----------------------------------------------------------------------------
# generate


def data_block(base_dir, stand_ins="none"):
    """The `### Data` block generate() adds to the header when the data dir holds no shards."""
    return (f"### Data\n- Pretraining data: none found in {base_dir / 'base_data_climbmix'}\n"
            f"- Offline stand-ins: {stand_ins}\n\n")


def test_generate_reproduces_the_example_layout(monkeypatch, tmp_path, base_dir):
    run_example(monkeypatch).generate()
    expected = (
        EXAMPLE_HEADER.replace("Run started:", data_block(base_dir) + "Run started:")
        + "## Base model evaluation\ntimestamp: 2025-10-16 20:22:26\n\n"
          "- Model: base_model (step 21400)\n- CORE metric: 0.1957\n- boolq: -0.4816\n\n\n"
        + chat_eval_text("mid", "20:38:25", {"ARC-Easy": "0.3838", "ARC-Challenge": "0.2952", "MMLU": "0.3165",
                                             "GSM8K": "0.0417", "HumanEval": "0.0854"}, "0.0909")
        + "## Chat SFT\ntimestamp: 2025-10-16 20:41:11\n\n- run: dummy\n- source: mid\n- Training rows: 20,843\n"
          "- Training loss: 1.1076\n\n\n"
        + chat_eval_text("sft", "20:47:57", {"ARC-Easy": "0.3969", "ARC-Challenge": "0.3029", "MMLU": "0.3159",
                                             "GSM8K": "0.0531", "HumanEval": "0.0854"}, "0.0985")
        + EXAMPLE_SUMMARY
    )
    assert (base_dir / "report" / "report.md").read_text() == expected
    assert (tmp_path / "report.md").read_text() == expected  # the copy in the current directory


def test_sft_logged_under_its_later_upstream_name_is_not_dropped(monkeypatch, base_dir):
    # Upstream (Mar 2026) chat_sft logged "SFT" -> sft.md while generate() read chat-sft.md, so the SFT
    # statistics silently vanished from report.md.
    run_example(monkeypatch, sft_title="SFT").generate()
    text = (base_dir / "report" / "report.md").read_text()
    assert "## Chat SFT\n" in text and "- Training loss: 1.1076\n" in text
    assert not (base_dir / "report" / "sft.md").exists()
    assert text.index("## Chat SFT") < text.index("## Chat evaluation sft")


def test_unknown_section_is_kept_after_the_known_ones_with_a_warning(monkeypatch, base_dir, caplog):
    r = run_example(monkeypatch)
    monkeypatch.setattr(report, "_now", lambda: at("21:00:00"))
    with caplog.at_level(logging.WARNING, logger="nanochat.report"):
        r.log("Custom distillation", [{"Teacher": "d32", "loss": 0.5}])
        r.generate()
    assert "'Custom distillation' is not one of the pipeline stages" in caplog.text
    assert "custom-distillation.md is not a pipeline stage" in caplog.text
    text = (base_dir / "report" / "report.md").read_text()
    assert text.index("## Chat evaluation sft") < text.index("## Custom distillation") < text.index("## Summary")
    assert "- Teacher: d32\n" in text


def test_missing_sections_warn_except_the_optional_base_loss(monkeypatch, caplog):
    r = run_example(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="nanochat.report"):
        r.generate()
    assert "tokenizer-training.md is missing" in caplog.text
    assert "chat-rl.md is missing" in caplog.text
    assert "base-model-loss" not in caplog.text  # listed for order, never produced by our base_eval


def test_metric_keys_match_exactly_not_as_substrings():
    text = ("- task_name: GSM8K\n- temperature: 0.0000\n- MMLU-Pro: 0.9000\n- ARC-Easy: 0.5000\n"
            "- ChatCORE metric: 0.1000 (vs baseline: 0.25)\n- CORE metric estimate: 0.3000\n")
    found = extract_metrics(text, report.METRIC_KEYS["Chat evaluation sft"])
    assert found == {"ARC-Easy": "0.5000", "ChatCORE": "0.1000 (vs baseline: 0.25)"}
    assert extract_metrics(text, report.METRIC_KEYS["Base model evaluation"]) == {}


def test_cli_arg_line_does_not_become_a_summary_value(monkeypatch, base_dir):
    monkeypatch.setattr(report, "collect_environment", lambda cwd=None: EXAMPLE_ENV)
    r = get_report()
    r.reset()
    r.log("Chat evaluation rl", [{**CHAT_ARGS, "source": "rl", "task_name": "HumanEval"}, {"GSM8K": 0.07}])
    r.generate()
    summary = (base_dir / "report" / "report.md").read_text().split("## Summary")[1]
    assert "| GSM8K           | -        | -        | -        | 0.0700   |" in summary
    assert "HumanEval" not in summary


def test_wall_clock_runs_from_start_to_last_non_rl_section(monkeypatch, base_dir):
    r = run_example(monkeypatch)
    monkeypatch.setattr(report, "_now", lambda: at("23:59:00"))
    r.log("Chat RL", [{"run": "dummy"}])
    r.log("Chat evaluation rl", [{"GSM8K": 0.0758}])
    r.generate()
    text = (base_dir / "report" / "report.md").read_text()
    assert text.endswith("Total wall clock time: 3h38m\n")
    assert "| GSM8K           | -        | 0.0417   | 0.0531   | 0.0758   |" in text


def test_generate_without_header(base_dir, caplog):
    r = get_report()
    with caplog.at_level(logging.WARNING, logger="nanochat.report"):
        r.generate()
    assert "Did you forget to run `python -m nanochat.report reset`?" in caplog.text
    text = (base_dir / "report" / "report.md").read_text()
    assert text.startswith(data_block(base_dir) + "## Summary\n\n[bloat data missing]\n\n| Metric ")
    assert text.endswith("Total wall clock time: unknown\n")


def test_reset_removes_old_sections(monkeypatch, base_dir):
    r = run_example(monkeypatch)
    monkeypatch.setattr(report, "_now", lambda: T0)
    r.log("Leftover experiment", [{"x": 1}])
    r.generate()
    r.reset()
    assert sorted(os.listdir(base_dir / "report")) == ["header.md"]


# -----------------------------------------------------------------------------
# atomic writes, ranks, CLI


def test_log_replaces_a_section_atomically(base_dir):
    r = get_report()
    path = r.log("Chat SFT", [{"Training loss": 1.0}])
    before = open(path).read()

    class Exploding:
        def __str__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        r.log("Chat SFT", [{"Training loss": 2.0, "weird": Exploding()}])
    assert open(path).read() == before  # the old section survives a crash mid-write
    assert os.listdir(base_dir / "report") == ["chat-sft.md"]  # and no temp file is left


def test_non_zero_ranks_get_a_dummy(monkeypatch, base_dir):
    monkeypatch.setenv("RANK", "3")
    r = get_report()
    assert isinstance(r, DummyReport)
    r.log("Chat SFT", [{"a": 1}])
    r.reset()
    r.generate()
    assert not (base_dir / "report").exists()


def test_cli_reset_then_generate(monkeypatch, tmp_path, base_dir):
    monkeypatch.setattr(report, "collect_environment", lambda cwd=None: EXAMPLE_ENV)
    assert report.main(["reset"]) == 0
    assert (base_dir / "report" / "header.md").exists()
    assert report.main([]) == 0  # generate is the default
    assert (tmp_path / "report.md").read_text().startswith("# nanochat training report\n")
    with pytest.raises(SystemExit):
        report.main(["publish"])


# -----------------------------------------------------------------------------
# environment: git and bloat


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_bloat_counts_characters_of_every_tracked_file(tmp_path):
    repo = tmp_path / "repo"
    deep = repo / ("d" * 100) / ("e" * 100)
    deep.mkdir(parents=True)
    (repo / "unicode.md").write_text("héllo wörld\nnaïve ✓", encoding="utf-8")  # 19 characters, 24 bytes, 2 lines
    (repo / "ignored.txt").write_text("not a counted type\n")
    (repo / "uv.lock").write_text("a\nb\nc\n")
    # Enough long paths (~270 KB of names) that an `xargs wc` pipeline would run wc more than once.
    for i in range(1000):
        (deep / f"module_{i:04d}_{'x' * 40}.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    info = report.bloat_info(str(repo))
    assert info == {"chars": 19 + 1000 * 6, "lines": 2 + 1000, "files": 1001, "tokens": (19 + 6000) // 4, "deps": 3}


def test_git_info_reads_branch_commit_message_and_dirty(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.py").write_text("a = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "m" * 100 + "\n\nbody text")
    info = report.git_info(str(repo))
    assert info["branch"] == "main" and info["message"] == "m" * 80 and info["dirty"] is False
    assert len(info["commit"]) >= 7
    (repo / "a.py").write_text("a = 2\n")
    assert report.git_info(str(repo))["dirty"] is True
    outside = report.git_info(str(tmp_path))  # not a repository
    assert outside["branch"] == "unknown" and outside["commit"] == "unknown"


# -----------------------------------------------------------------------------
# for people: curve plots, what the run trained on, the summary with offline rows, the order

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_width(data):
    return int.from_bytes(data[16:20], "big")  # the IHDR chunk follows the 8-byte signature


def section_of(text, title):
    """The text of section `title` up to the next `## ` heading."""
    start = text.index(f"## {title}\n")
    return text[start:text.index("\n## ", start)]


def test_plots_are_written_and_linked_under_their_stage(monkeypatch, tmp_path, base_dir):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))  # matplotlib's font cache: not in ~/.cache
    r = run_example(monkeypatch)
    monkeypatch.setattr(report, "_now", lambda: at("21:00:00"))
    for title in ("Base model training", "Midtraining", "Chat RL"):
        r.log(title, [{"run": "dummy"}])
    # The training loop's own writer, so the plots read what the stages really write.
    _write_curve("base", {"train_loss": [[s, 11.0 - 0.2 * s] for s in range(40)],
                          "val_bpb": [[0, 3.0], [20, 1.5], [39, None]]}, resumed_from=None)  # NaN is written as null
    _write_curve("mid", {"train_loss": [], "val_bpb": []}, resumed_from=None)  # no points: no plot
    (base_dir / "report" / "curves" / "sft.json").write_text("")  # empty file: no plot
    _write_curve("rl", {"train_loss": [[s, 0.1] for s in range(8)], "val_bpb": [],
                        "reward": [[s, s / 8] for s in range(8)]}, resumed_from=None)
    r.generate()

    for name, panels in (("report-base-curves.png", 2), ("report-rl-curves.png", 1)):  # RL: the reward alone
        png = (base_dir / "report" / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and png_width(png) == panels * 550
        assert (tmp_path / name).read_bytes() == png  # copied beside ./report.md
    assert not list((base_dir / "report").glob("report-mid*")) and not list((base_dir / "report").glob("report-sft*"))

    text = (tmp_path / "report.md").read_text()
    assert section_of(text, "Base model training").endswith(
        "- run: dummy\n\n![Base model training curves](report-base-curves.png)\n\n")
    assert "![Chat RL curves](report-rl-curves.png)" in section_of(text, "Chat RL")
    assert "![" not in section_of(text, "Midtraining") and "![" not in section_of(text, "Chat SFT")
    for target in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (tmp_path / target).exists() and (base_dir / "report" / target).exists()  # relative links resolve


def test_no_curves_means_no_plots_and_no_error(monkeypatch, tmp_path, base_dir, caplog):
    def never(*args):
        raise AssertionError("nothing to plot, so nothing is rendered")

    monkeypatch.setattr(report, "render_curves", never)
    r = run_example(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="nanochat.report"):
        r.generate()  # no curves dir at all
        (base_dir / "report" / "curves").mkdir()
        (base_dir / "report" / "curves" / "base.json").write_text("")
        r.generate()  # an empty curve file
    assert "Could not plot" not in caplog.text and "Cannot plot" not in caplog.text
    text = (tmp_path / "report.md").read_text()
    assert "![" not in text and text.endswith("Total wall clock time: 3h38m\n")
    assert not list(tmp_path.glob("*.png")) and not list((base_dir / "report").glob("*.png"))


def test_a_failed_plot_is_a_warning_and_the_report_is_still_written(monkeypatch, base_dir, caplog):
    def no_matplotlib(*args):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "render_curves", no_matplotlib)
    r = run_example(monkeypatch)
    curves = base_dir / "report" / "curves"
    curves.mkdir()
    (curves / "base.json").write_text('{"train_loss": [[0, 1.0')  # cut off mid-write
    (curves / "rl.json").write_text('{"reward": [[0, 0.5]]}')
    with caplog.at_level(logging.WARNING, logger="nanochat.report"):
        r.generate()
    assert f"Could not plot {curves / 'base.json'} (JSONDecodeError" in caplog.text
    assert "Cannot plot the training curves: No module named 'matplotlib'" in caplog.text
    text = (base_dir / "report" / "report.md").read_text()
    assert "![" not in text and "## Summary" in text


def test_reset_removes_old_curves_and_plots(monkeypatch, base_dir):
    r = run_example(monkeypatch)
    _write_curve("base", {"train_loss": [[0, 1.0]], "val_bpb": []}, resumed_from=None)
    (base_dir / "report" / "report-base-curves.png").write_bytes(PNG_SIGNATURE)
    monkeypatch.setattr(report, "_now", lambda: T0)
    r.reset()
    assert sorted(os.listdir(base_dir / "report")) == ["header.md"]  # a new run starts without the old curves


def test_header_names_the_dataset_and_every_stand_in(monkeypatch, base_dir):
    data_dir = base_dir / "base_data_climbmix"
    docs = [f"document {i} " + "x" * 40 for i in range(40)]
    write_shards(docs, str(data_dir), {"source": "offline", "python": "3.11.7"}, shard_chars=500, val_fraction=0.1)
    assert len(list_parquet_files(str(data_dir))) == 2  # shards close at 1024-document row groups
    r = run_example(monkeypatch)
    monkeypatch.setattr(report, "_now", lambda: at("21:00:00"))
    r.log("Base model training", [{"run": "dummy"}, {"Offline stand-ins": "none"}])
    r.log("Midtraining", [{"Offline stand-ins": "GSM8K main/train unavailable offline: A used instead; identity: B"}])
    r.log("Chat RL", [{"Offline stand-ins": "GSM8K main/train unavailable offline: A used instead; SpellingBee: C"}])
    r.generate()
    header = (base_dir / "report" / "report.md").read_text().split("\n---\n")[0]
    chars = sum(len(d) for d in docs)
    assert header.endswith(
        "### Data\n"
        f"- Pretraining data: the offline corpus (text shipped with Python 3.11.7 and its installed packages): "
        f"1 train shard + 1 val shard, {chars:,} characters, in {data_dir}\n"
        "- Offline stand-ins:\n  - GSM8K main/train unavailable offline: A used instead\n  - identity: B\n  - SpellingBee: C\n\n"
        "Run started: 2025-10-16 17:09:12\n")


def test_dataset_info_names_each_kind_of_shards(base_dir, tmp_path):
    climbmix = base_dir / "base_data_climbmix"
    assert report.dataset_info() == f"none found in {climbmix}"
    legacy = base_dir / "base_data"
    legacy.mkdir(parents=True)
    for i in (0, 1, 2):
        (legacy / f"shard_{i:05d}.parquet").write_bytes(b"")
    assert report.dataset_info() == f"FineWeb-Edu (legacy downloaded shards): 2 train shards + 1 val shard, in {legacy}"
    climbmix.mkdir()
    for i in (0, 1):
        (climbmix / f"shard_{i:05d}.parquet").write_bytes(b"")
    (climbmix / ".shard_00002.parquet.tmp").write_bytes(b"")  # an interrupted download is not a shard
    assert report.dataset_info() == f"ClimbMix (downloaded shards): 1 train shard + 1 val shard, in {climbmix}"
    (climbmix / "manifest.json").write_text('{"source": "ingest", "inputs": ["/data/notes"], "train_chars": 12000, '
                                            '"val_chars": 345, "num_shards": 2}')
    assert report.dataset_info() == f"ingested text (/data/notes): 1 train shard + 1 val shard, 12,345 characters, in {climbmix}"


def test_summary_has_its_own_synthetic_arithmetic_row_and_stays_aligned(monkeypatch, base_dir):
    monkeypatch.setattr(report, "collect_environment", lambda cwd=None: EXAMPLE_ENV)
    r = get_report()
    r.reset()
    r.log("Base model evaluation", [{"model": "base_model (step 60)", "CORE metric": 0.0123}])
    # Offline: GSM8K could not be had, so the chat eval scored the synthetic arithmetic problems instead;
    # there is no midtraining column to fill and no ChatCORE (it needs every task).
    r.log("Chat evaluation sft", [{**CHAT_ARGS, "source": "sft"}, {"ARC-Easy": 0.25, "SyntheticArithmetic": 0.03125}])
    r.log("Chat evaluation rl", [{**CHAT_ARGS, "source": "rl"}, {"SyntheticArithmetic": 0.0625}])
    r.generate()
    summary = (base_dir / "report" / "report.md").read_text().split("## Summary\n")[1]
    table = [line for line in summary.splitlines() if line.startswith("|")]
    assert table == [
        "| Metric              | BASE     | MID      | SFT      | RL       |",
        "|---------------------|----------|----------|----------|----------|",
        "| CORE                | 0.0123   | -        | -        | -        |",
        "| ARC-Easy            | -        | -        | 0.2500   | -        |",
        "| SyntheticArithmetic | -        | -        | 0.0312   | 0.0625   |",
    ]


def test_sections_come_in_pipeline_order(monkeypatch, base_dir):
    monkeypatch.setattr(report, "collect_environment", lambda cwd=None: EXAMPLE_ENV)
    r = get_report()
    r.reset()
    order = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
             "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft",
             "Chat RL", "Chat evaluation rl"]
    for title in reversed(order):  # written in any order, read in the pipeline's
        r.log(title, [{"stage": title}])
    r.generate()
    headings = re.findall(r"^## (.+)$", (base_dir / "report" / "report.md").read_text(), re.M)
    assert headings == ["Environment", *order, "Summary"]


def test_header_names_the_cpu_model():
    env = {**EXAMPLE_ENV, "gpu": {"count": 0}, "system": {**EXAMPLE_ENV["system"], "cpu_model": "AMD EPYC 9654"}}
    assert "- Platform: Linux\n- CPU: AMD EPYC 9654\n- CPUs: 104 cores (208 logical)\n" in format_header(env, T0)
    assert "- CPU:" not in format_header(EXAMPLE_ENV, T0)  # unknown model: no line
