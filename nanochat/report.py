"""
The markdown training report: each stage logs a section, `generate` stitches the header (environment, and
the data the run trained on), the sections in pipeline order, each training stage's curve plot and a summary
table into <base>/report/report.md and ./report.md. Tests: tests/test_report.py.

    python -m nanochat.report reset       # start of a run: delete old sections, curves and plots; write header.md
    python -m nanochat.report generate    # end of a run (also the default with no argument)
    get_report().log(section="Chat SFT", data=[vars(args), {"Training loss": 1.1076}])   # from a stage
"""

import argparse
import datetime
import io
import json
import logging
import math
import os
import pathlib
import platform
import re
import subprocess
import sys

from nanochat.common import atomic_write, get_base_dir, setup_default_logging
from nanochat.dataset import LEGACY_DATA_DIR_NAME, list_parquet_files, read_manifest, training_data_dir

log = logging.getLogger("nanochat.report")

# (title, summary-table stage) in report order; the file of a section is slugify(title) + ".md". The writers
# and generate() share this one table: upstream's SFT section once vanished under a title the report never read.
SECTIONS = (
    ("Tokenizer training", None),
    ("Tokenizer evaluation", None),
    ("Base model training", "base"),
    ("Base model loss", "base"),
    ("Base model evaluation", "base"),
    ("Midtraining", "mid"),
    ("Chat evaluation mid", "mid"),
    ("Chat SFT", "sft"),
    ("Chat evaluation sft", "sft"),
    ("Chat RL", "rl"),
    ("Chat evaluation rl", "rl"),
    ("lm-eval harness", None),  # scripts/lm_eval.py, when used
    ("Hugging Face export", None),  # scripts/export_hf.py, when used
)
# Not warned about when absent: base_eval writes loss and CORE in one section (as upstream's latest does), and
# the tools below run only when wanted.
OPTIONAL_SECTIONS = {"Base model loss", "lm-eval harness", "Hugging Face export"}
ALIASES = {"sft": "Chat SFT", "rl": "Chat RL"}  # titles upstream's later scripts used; other unknowns go last
STAGES = ("base", "mid", "sft", "rl")

# Summary rows: which `- key: value` lines of which section become which row.
# SyntheticArithmetic is what an offline chat eval scores instead of GSM8K: a row of its own, never GSM8K's.
_CHAT_KEYS = {"ARC-Easy": "ARC-Easy", "ARC-Challenge": "ARC-Challenge", "MMLU": "MMLU", "GSM8K": "GSM8K",
              "HumanEval": "HumanEval", "SpellingBee": "SpellingBee", "SyntheticArithmetic": "SyntheticArithmetic",
              "ChatCORE metric": "ChatCORE"}
METRIC_KEYS = {
    "Base model evaluation": {"CORE metric": "CORE"},
    "Chat evaluation mid": _CHAT_KEYS,
    "Chat evaluation sft": _CHAT_KEYS,
    "Chat evaluation rl": _CHAT_KEYS,
}
BLOAT_PATTERNS = ("*.py", "*.md", "*.rs", "*.html", "*.toml", "*.sh")
HOURLY_RATES = (("H100", 3.00), ("A100", 1.79), ("V100", 0.55))  # $/GPU/hour (rough cloud prices), by the first GPU's name
DEFAULT_HOURLY_RATE = 2.00
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# Training-curve plots: stage (curve file name) -> (the section the plot is linked under, its panels as
# (series in the curve file, panel title)). RL's loss is a policy-gradient surrogate, so RL plots the reward.
_LOSS_PANELS = (("train_loss", "train loss"), ("val_bpb", "val bpb"))
CURVE_PLOTS = {
    "base": ("Base model training", _LOSS_PANELS),
    "mid": ("Midtraining", _LOSS_PANELS),
    "sft": ("Chat SFT", _LOSS_PANELS),
    "rl": ("Chat RL", (("reward", "mean reward"), ("sequence_length", "mean sequence length"))),
}
CURVES_DIR = "curves"
PLOT_NAME = "report-{}-curves.png"  # beside report.md; the prefix keeps them together in ./
STAND_INS_KEY = "Offline stand-ins"  # the row each training stage writes with tasks.common.fallbacks_used()


def _now():
    return datetime.datetime.now()


def slugify(title):  # lower case, anything but [a-z0-9._] becomes '-'
    slug = re.sub(r"[^a-z0-9._]+", "-", title.lower()).strip("-")
    if not slug:
        raise ValueError(f"report section title {title!r} has no usable characters")
    return slug


def canonical_title(section):  # the SECTIONS title a name stands for, else the name itself
    slug = slugify(section)
    if slug in ALIASES:
        return ALIASES[slug]
    return next((title for title, _ in SECTIONS if slugify(title) == slug), section)


def format_value(value):
    """A report value: floats with 4 decimals, ints >= 10,000 with thousands separators, else str()."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10000:
        return f"{value:,}"
    return str(value)


def format_section(section, data, timestamp):
    """The markdown of one section: title, timestamp, then each item (str verbatim, dict as `- k: v` lines)."""
    out = [f"## {section}\n", f"timestamp: {timestamp.strftime(TIME_FORMAT)}\n\n"]
    for item in data:
        if not item:
            continue  # None, {}, "" leave no trace
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.extend(f"- {k}: {format_value(v)}\n" for k, v in item.items())
        else:
            raise TypeError(f"report data items must be dicts or strings, got {type(item).__name__}")
    out.append("\n")
    return "".join(out)


def extract_metrics(text, keys):
    """{row: value} from lines `- {key}: {value}` whose key is exactly one of `keys` (last one wins): a
    CLI-argument line `- task_name: GSM8K` is not the GSM8K score."""
    found = {}
    for line in text.splitlines():
        for key, row in keys.items():
            prefix = f"- {key}: "
            if line.startswith(prefix):
                found[row] = line[len(prefix):].strip()
    return found


def _first_time(text, prefix):
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                return datetime.datetime.strptime(line[len(prefix):].strip(), TIME_FORMAT)
            except ValueError:
                return None
    return None


def _run(cmd, cwd=None):  # stripped stdout; "" if it printed nothing but succeeded; None if it failed
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=5, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.stdout.strip():
        return r.stdout.strip()
    return "" if r.returncode == 0 else None


def git_info(cwd=None):
    """Branch, short commit, dirty flag and first line of the last commit message (80 chars)."""
    message = _run(["git", "log", "-1", "--pretty=%B"], cwd)
    return {
        "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd) or "unknown",
        "commit": _run(["git", "rev-parse", "--short", "HEAD"], cwd) or "unknown",
        "dirty": bool(_run(["git", "status", "--porcelain"], cwd)),
        "message": message.splitlines()[0][:80] if message else "unknown",
    }


def cpu_model():  # "AMD EPYC 9654 96-Core Processor", or "" when the system won't say
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model"):  # x86 / ARM spellings
                    return value.strip()
    if platform.system() == "Darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or ""
    return platform.processor()


def bloat_info(cwd=None):
    """Size of the tracked source: characters (not bytes), lines, files, ~tokens, uv.lock lines."""
    root = _run(["git", "rev-parse", "--show-toplevel"], cwd) or os.path.abspath(cwd or ".")
    # Read here: upstream's xargs into `wc -lc` counted bytes and, on a long list, only the last batch.
    listing = _run(["git", "ls-files", "-z", "--", *BLOAT_PATTERNS], root) or ""
    chars = lines = files = 0
    for rel in filter(None, listing.split("\0")):
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            continue  # deleted in the working tree but still in the index
        text = pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
        chars += len(text)
        lines += len(text.splitlines())
        files += 1
    uv_lock = pathlib.Path(root, "uv.lock")
    deps = len(uv_lock.read_text(encoding="utf-8", errors="replace").splitlines()) if uv_lock.exists() else 0
    return {"chars": chars, "lines": lines, "files": files, "tokens": chars // 4, "deps": deps}


def collect_environment(cwd=None):
    import psutil
    import torch

    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    gpu = {"count": len(props)}
    if props:
        gpu.update(names=[p.name for p in props], memory_gb=sum(p.total_memory for p in props) / 1024**3,
                   cuda_version=torch.version.cuda or "unknown")
    system = {"platform": platform.system(), "cpu_model": cpu_model(), "physical_cores": psutil.cpu_count(logical=False) or 0,
              "logical_cores": psutil.cpu_count(logical=True) or 0, "memory_gb": psutil.virtual_memory().total / 1024**3,
              "python": platform.python_version(), "torch": torch.__version__}
    return {"git": git_info(cwd), "gpu": gpu, "system": system, "bloat": bloat_info(cwd)}


def format_header(env, generated_at):
    """header.md without the `Run started` line (Report.reset adds it)."""
    g, gpu, s, b = env["git"], env["gpu"], env["system"], env["bloat"]
    lines = [
        "# nanochat training report", "", f"Generated: {generated_at.strftime(TIME_FORMAT)}", "",
        "## Environment", "",
        "### Git Information", f"- Branch: {g['branch']}", f"- Commit: {g['commit']} ({'dirty' if g['dirty'] else 'clean'})",
        f"- Message: {g['message']}", "",
        "### Hardware", f"- Platform: {s['platform']}",
    ]
    if s.get("cpu_model"):  # "" when the system won't say
        lines.append(f"- CPU: {s['cpu_model']}")
    lines += [f"- CPUs: {s['physical_cores']} cores ({s['logical_cores']} logical)", f"- Memory: {s['memory_gb']:.1f} GB"]
    if gpu["count"]:
        per_gpu = next((rate for key, rate in HOURLY_RATES if key in gpu["names"][0]), DEFAULT_HOURLY_RATE)
        lines += [f"- GPUs: {gpu['count']}x {', '.join(sorted(set(gpu['names'])))}",
                  f"- GPU Memory: {gpu['memory_gb']:.1f} GB total", f"- CUDA Version: {gpu['cuda_version']}",
                  f"- Hourly Rate: ${per_gpu * gpu['count']:.2f}/hour"]
    else:
        lines.append("- GPUs: None available")
    lines += [
        "", "### Software", f"- Python: {s['python']}", f"- PyTorch: {s['torch']}", "", "",
        "### Bloat", f"- Characters: {b['chars']:,}", f"- Lines: {b['lines']:,}", f"- Files: {b['files']:,}",
        f"- Tokens (approx): {b['tokens']:,}", f"- Dependencies (uv.lock lines): {b['deps']:,}", "", "",
    ]
    return "\n".join(lines)


def dataset_info(data_dir=None):  # read by generate(): `reset` runs before the data is downloaded
    """One line naming the pretraining shards in `data_dir` (default: what training reads) and how many."""
    data_dir = training_data_dir() if data_dir is None else data_dir
    files = list_parquet_files(data_dir)
    if not files:
        return f"none found in {data_dir}"
    try:
        manifest = read_manifest(data_dir) or {}
    except (OSError, ValueError) as e:  # the report still names what it can
        log.warning("Could not read the manifest of %s (%s); the report names its shards without it", data_dir, e)
        manifest = {"source": "unknown (unreadable manifest)"}
    source = manifest.get("source", "climbmix")
    if os.path.basename(data_dir) == LEGACY_DATA_DIR_NAME:
        kind = "FineWeb-Edu (legacy downloaded shards)"
    elif source == "climbmix":
        kind = "ClimbMix (downloaded shards)"
    elif source == "offline":
        kind = f"the offline corpus (text shipped with Python {manifest.get('python', '?')} and its installed packages)"
    elif source == "ingest":
        kind = f"ingested text ({', '.join(manifest.get('inputs') or ['?'])})"
    else:
        kind = f"{source} shards"
    # The last shard is the validation split (see nanochat/dataloader.py).
    shards = f"{len(files) - 1} train shard{'s' * (len(files) != 2)} + 1 val shard"
    chars = manifest.get("train_chars", 0) + manifest.get("val_chars", 0)
    return f"{kind}: {shards}{f', {chars:,} characters' if chars else ''}, in {data_dir}"


def stand_ins(texts):  # every offline stand-in the sections name, in order, each once
    seen = {}
    for text in texts:
        for value in extract_metrics(text, {STAND_INS_KEY: "x"}).values():
            for item in value.split("; "):  # the writers join fallbacks_used() with "; "
                if item.strip() and item.strip() != "none":
                    seen.setdefault(item.strip(), None)
    return list(seen)


def read_curve(path):
    """{series: ([steps], [values])} of a curve file's finite points, {} if missing or empty; raises if not a curve."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    series = {}
    for key, points in data.items():
        kept = [] if key == "stage" else [(int(step), float(value)) for step, value in points
                                          if value is not None and math.isfinite(float(value))]
        if kept:
            series[key] = ([p[0] for p in kept], [p[1] for p in kept])
    return series


def render_curves(series, panels, title):  # PNG bytes: a panel per (series, panel title) that has points
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy and optional: only when plotting
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(key, name) for key, name in panels if key in series]
    fig = Figure(figsize=(5.5 * len(panels), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the headless Agg canvas, without pyplot's global state
    fig.suptitle(title, fontsize=12)
    # One x range for all panels: a stage's val bpb points line up under its train loss.
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    for ax, (key, name) in zip(axes, panels):
        steps, values = series[key]
        # A handful of evaluations reads better as dots on a line; thousands of steps as a plain line.
        ax.plot(steps, values, marker="o" if len(steps) <= 50 else None, markersize=3, linewidth=1.2)
        note = ""
        tail = values[len(values) // 10:]  # the run after its first tenth
        lo, hi = min(tail), max(tail)
        span = (hi - lo) or abs(hi) * 0.1 or 1.0
        if len(values) >= 20 and max(values) > hi + span:
            # The first steps' loss (~ln(vocab size)) is several times the final one; scaled to it, the
            # rest of the run is a flat line. Zoom on the rest and say how high the cut-off part goes.
            ax.set_ylim(lo - 0.1 * span, hi + 0.5 * span)
            note = f", early steps up to {max(values):.4g} off the chart"
        if key == "val_bpb":
            best = min(range(len(values)), key=values.__getitem__)
            ax.set_title(f"{name} (min {values[best]:.4f} at step {steps[best]}{note})", fontsize=10)
        else:
            ax.set_title(f"{name} (last {values[-1]:.4g}{note})", fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
    steps = {step for key, _ in panels for step in series[key][0]}
    if len(steps) == 1:  # one point: a window around it rather than matplotlib's +-0.05
        axes[0].set_xlim(min(steps) - 1, min(steps) + 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plots(report_dir):
    """Plot each stage's curve file into report_dir; {section title: PNG file name} of those written (a failure warns)."""
    plots = {}
    for stage, (title, panels) in CURVE_PLOTS.items():
        path = os.path.join(report_dir, CURVES_DIR, f"{stage}.json")
        try:
            series = read_curve(path)
            if not any(key in series for key, _ in panels):
                continue
            png = render_curves(series, panels, f"{title}: {', '.join(n for k, n in panels if k in series)} by step")
            atomic_write(os.path.join(report_dir, PLOT_NAME.format(stage)), png)
        except ImportError as e:
            log.warning("Cannot plot the training curves: %s (matplotlib is a nanochat dependency: `uv sync`); "
                        "report.md is written without plots", e)
            return plots
        except Exception as e:  # a plot is a nicety: whatever went wrong costs this plot, never the report
            log.warning("Could not plot %s (%s: %s); report.md is written without that plot", path, type(e).__name__, e)
            continue
        plots[title] = PLOT_NAME.format(stage)
    return plots


def format_summary(bloat, metrics, start, end):
    """The `## Summary` block: bloat lines, the metric table (BASE/MID/SFT/RL), total wall-clock time."""
    rows = set().union(*(metrics[s] for s in STAGES))
    rows = sorted(rows, key=lambda r: (r != "CORE", r == "ChatCORE", r))  # CORE first, ChatCORE last
    # As wide as the example report's columns (15 and 8), wider for a longer name or value: the table stays aligned.
    name_w = max([15, *map(len, rows)])
    col_w = max([8, *(len(v) for s in STAGES for v in metrics[s].values())])
    table = ["| " + "Metric".ljust(name_w) + " |" + "".join(f" {s.upper():<{col_w}} |" for s in STAGES),
             "|" + "-" * (name_w + 2) + "|" + "".join("-" * (col_w + 2) + "|" for _ in STAGES)]
    for row in rows:
        table.append(f"| {row:<{name_w}} |" + "".join(f" {metrics[s].get(row, '-'):<{col_w}} |" for s in STAGES))
    if start is not None and end is not None:
        minutes = int((end - start).total_seconds() // 60)
        wall = f"Total wall clock time: {minutes // 60}h{minutes % 60}m"
    else:
        wall = "Total wall clock time: unknown"
    return "## Summary\n\n" + bloat + "\n\n" + "\n".join(table) + "\n\n" + wall + "\n"


class Report:
    """Writes sections into `report_dir` and assembles them into report.md. Every write is atomic."""

    def __init__(self, report_dir):
        self.report_dir = report_dir

    def _path(self, name):
        return os.path.join(self.report_dir, name)

    def log(self, section, data):
        """Write (replace) the section file for `section`; returns its path. data: dicts and strings."""
        title = canonical_title(section)
        if title not in {t for t, _ in SECTIONS}:
            log.warning("Report section %r is not one of the pipeline stages (%s); report.md will show it after them",
                        section, ", ".join(t for t, _ in SECTIONS))
        slug = slugify(title)
        if slug in ("header", "report"):
            raise ValueError(f"report section title {section!r} would overwrite {slug}.md; choose another title")
        path = self._path(slug + ".md")
        atomic_write(path, format_section(title, data, _now()))  # formatted first: a crash can't leave half
        return path

    def reset(self, cwd=None):
        """Delete every section, curve, plot and report.md, then write header.md with the environment and the start time."""
        if os.path.isdir(self.report_dir):
            for name in os.listdir(self.report_dir):
                if name.endswith((".md", ".png")):  # this dir is ours; stale extras would leak into the next report
                    os.remove(self._path(name))
        curves = self._path(CURVES_DIR)
        if os.path.isdir(curves):  # a previous run's curves would be plotted as this run's
            for name in os.listdir(curves):
                if name.endswith(".json"):
                    os.remove(os.path.join(curves, name))
            if not os.listdir(curves):
                os.rmdir(curves)
        header = format_header(collect_environment(cwd), _now())
        atomic_write(self._path("header.md"), header + f"Run started: {_now().strftime(TIME_FORMAT)}\n\n---\n\n")
        log.info("Reset report and wrote header to %s", self._path("header.md"))

    def generate(self, copy_to="."):
        """Write report.md (and its plots) into the report dir and a copy into `copy_to` (None = none); returns it."""
        parts, metrics, end = [], {s: {} for s in STAGES}, None
        plots = write_plots(self.report_dir)
        header_path = self._path("header.md")
        if os.path.exists(header_path):
            header = pathlib.Path(header_path).read_text(encoding="utf-8")
            start = _first_time(header, "Run started:")
            m = re.search(r"### Bloat\n(.*?)\n\n", header, re.S)
            bloat = m.group(1) if m else "[bloat data missing]"
        else:
            log.warning("%s does not exist. Did you forget to run `python -m nanochat.report reset`?", header_path)
            header, start, bloat = "", None, "[bloat data missing]"
        parts.append(header)
        known = set()
        for title, stage in SECTIONS:
            name = slugify(title) + ".md"
            known.add(name)
            if not os.path.exists(self._path(name)):
                if title not in OPTIONAL_SECTIONS:
                    log.warning("Report section %s is missing (stage not run?); skipping it", name)
                continue
            content = pathlib.Path(self._path(name)).read_text(encoding="utf-8")
            if title in plots:  # a relative link: it resolves beside either copy of report.md
                content += f"![{title} curves]({plots[title]})\n\n"
            parts.append(content + "\n")
            if stage != "rl":  # RL is experimental and excluded from the wall-clock total
                end = _first_time(content, "timestamp:") or end
            if title in METRIC_KEYS:
                metrics[stage].update(extract_metrics(content, METRIC_KEYS[title]))
        extras = []
        for name in sorted(os.listdir(self.report_dir)) if os.path.isdir(self.report_dir) else []:
            if name.endswith(".md") and name not in known | {"header.md", "report.md"}:
                content = pathlib.Path(self._path(name)).read_text(encoding="utf-8")
                extras.append((_first_time(content, "timestamp:") or datetime.datetime.min, name, content))
        for _, name, content in sorted(extras):  # oldest first
            log.warning("Report section %s is not a pipeline stage; appending it after the known sections", name)
            parts.append(content + "\n")
        parts.append(format_summary(bloat, metrics, start, end))
        listed = "".join(f"\n  - {item}" for item in stand_ins(parts[1:])) or " none"  # one per line: they can be long
        block = f"### Data\n- Pretraining data: {dataset_info()}\n- {STAND_INS_KEY}:{listed}\n\n"
        at = header.find("Run started:")  # the data block goes just before it, else at the end
        parts[0] = header + block if at < 0 else header[:at] + block + header[at:]
        out = self._path("report.md")
        text = "".join(parts)
        atomic_write(out, text)
        log.info("Wrote the report to %s%s", out, f" with {len(plots)} plot(s)" if plots else "")
        if copy_to is not None:
            copy = os.path.join(copy_to, "report.md")
            if not (os.path.exists(copy) and os.path.samefile(copy, out)):  # generated from inside the report dir
                for png in plots.values():
                    atomic_write(os.path.join(copy_to, png), pathlib.Path(self._path(png)).read_bytes())
                atomic_write(copy, text)
                log.info("Copied it%s to %s", " and its plots" if plots else "", os.path.abspath(copy))
        return out


class DummyReport:
    """What non-zero ranks get: every call does nothing, so stages can log unconditionally."""

    def _nothing(self, *args, **kwargs):
        return None

    log = reset = generate = _nothing


def get_report():
    """The real Report (in <base>/report) on rank 0, a DummyReport on every other rank."""
    if int(os.environ.get("RANK", "0")) == 0:
        return Report(os.path.join(get_base_dir(), "report"))
    return DummyReport()


def build_parser():
    p = argparse.ArgumentParser(prog="python -m nanochat.report", description="Reset or generate the training report.")
    p.add_argument("command", nargs="?", default="generate", choices=["generate", "reset"],
                   help="reset: clear sections and write the header (start of a run); generate: assemble report.md")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    report = get_report()
    getattr(report, args.command)()  # "reset" or "generate": the parser allows nothing else
    return 0


if __name__ == "__main__":
    sys.exit(main())
