"""
Shared pieces of the task datasets: the `Task` view (start/stop/step slicing over an example list),
`TaskMixture` / `TaskSequence`, the multiple-choice prompt `render_mc`, and `load_hf_dataset`, the one
place that fetches rows from the HuggingFace hub or from local files.

A conversation is a plain dict: {"messages": [{"role": "user"|"assistant"|"system", "content": str | parts}],
...task-specific keys}; an assistant message's parts are {"type": "text"|"python"|"python_output", "text": str}.

Offline use: put the rows (upstream row format, parquet or jsonl) under $NANOCHAT_TASKS_DIR (default
<base_dir>/task_data) as <org>--<name>/<subset or "default">/<split>.parquet|.jsonl or a <split>/ folder
of shards. On a machine with network, `python -m tasks.common` writes every dataset nanochat uses there:

    python -m tasks.common                    # all of them, into <base_dir>/task_data
    python -m tasks.common --out-dir /data/nanochat_tasks --only allenai/ai2_arc

Where data can't be had at all, stand-ins need no download: gsm8k_or_synthetic() gives generated
arithmetic problems instead of GSM8K, CustomJSON the identity conversations shipped in nanochat/data/,
SpellingBee a word list from the offline corpus. Each logs a warning the first time and is listed by
fallbacks_used(), for the training report.
"""

import abc
import argparse
import array
import bisect
import glob
import logging
import math
import operator
import os
import random

from nanochat.common import UserError

logger = logging.getLogger(__name__)

SHUFFLE_SEED = 42  # every task dataset is shuffled with this seed, as upstream


class DatasetUnavailableError(UserError, RuntimeError):
    """A task dataset could not be found locally nor fetched from the hub."""


# -----------------------------------------------------------------------------
# Task views


class Task(abc.ABC):
    """A logical view over a task's examples: example i of the view is physical example start + i*step.

    Subclasses implement num_examples() and get_example(physical_index); evaluation tasks also set
    eval_type ("categorical" | "generative") and implement evaluate(conversation, response).
    """

    eval_type = None  # training-only tasks have none

    def __init__(self, start=0, stop=None, step=1):
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        if stop is not None and (not isinstance(stop, int) or stop < start):
            raise ValueError(f"stop must be None or an int >= start ({start}), got {stop!r}")
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1, got {step!r}")
        self.start, self.stop, self.step = start, stop, step

    @abc.abstractmethod
    def num_examples(self):
        """Number of physical examples in the underlying data."""

    @abc.abstractmethod
    def get_example(self, index):
        """The conversation dict at physical `index`."""

    def evaluate(self, conversation, response):
        """Score `response` (a string) against `conversation`; evaluation tasks override this."""
        raise TypeError(f"{type(self).__name__} is a training-only task: it has no evaluate()")

    def __len__(self):
        # A stop past the end of the data means "to the end" (upstream would fail on the first index past it).
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, index):
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"task indices must be integers, got {type(index).__name__}")
        index = operator.index(index)  # numpy integers are fine too
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index out of range for {type(self).__name__} of length {n}")
        return self.get_example(self.start + index * self.step)


class TaskSequence(Task):
    """The tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.offsets = [0]
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def num_examples(self):
        return self.offsets[-1]

    def _locate(self, global_index):
        task_index = bisect.bisect_right(self.offsets, global_index) - 1
        return self.tasks[task_index][global_index - self.offsets[task_index]]

    def get_example(self, index):
        return self._locate(index)


class TaskMixture(TaskSequence):
    """All examples of all tasks, in one fixed shuffled order (random.Random(42)).

    Pass the same task twice to see it twice per epoch. The order equals upstream's, which shuffles the
    list of (task, local index) pairs: a shuffle permutes positions the same way whatever the items are,
    so shuffling the global indices gives the same order without building a tuple per example.
    """

    def __init__(self, tasks, **kwargs):
        super().__init__(tasks, **kwargs)
        order = list(range(self.offsets[-1]))
        random.Random(SHUFFLE_SEED).shuffle(order)
        self.order = array.array("q", order)  # 8 bytes per example instead of a Python int object each

    def get_example(self, index):
        return self._locate(self.order[index])


def render_mc(question, letters, choices):
    """The multiple-choice prompt used by ARC and MMLU.

    The letter follows its choice with no space ("- Paris=A"), so the prompt contains exactly the token
    the answer is ("A", not " A"), and binding choice to letter is easier for small models.
    """
    if len(letters) != len(choices):
        raise ValueError(f"got {len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


# -----------------------------------------------------------------------------
# Loading datasets


def local_tasks_dir():
    """Where local copies of task datasets live: $NANOCHAT_TASKS_DIR, else <base_dir>/task_data."""
    env = os.environ.get("NANOCHAT_TASKS_DIR")
    if env:
        return env
    from nanochat.common import get_base_dir

    return os.path.join(get_base_dir(), "task_data")


def local_dataset_dir(path, name=None, root=None):
    """<root>/<org>--<name>/<subset or 'default'>: the folder holding one subset's split files."""
    return os.path.join(root or local_tasks_dir(), path.replace("/", "--"), name or "default")


def _local_files(path, name, split):
    """Local files for (path, name, split), or [] when there are none."""
    folder = local_dataset_dir(path, name)
    for ext in ("parquet", "jsonl", "json"):
        single = os.path.join(folder, f"{split}.{ext}")
        if os.path.isfile(single):
            return [single]
        shards = sorted(glob.glob(os.path.join(folder, split, f"*.{ext}")))
        if shards:
            return shards
    return []


def _read_local(files):
    """Rows of local parquet/jsonl files as an in-memory datasets.Dataset (no cache files written)."""
    import datasets
    import pyarrow as pa
    import pyarrow.json as pajson
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f) if f.endswith(".parquet") else pajson.read_json(f))
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetUnavailableError(f"could not read task data file {f}: {e}") from e
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    return datasets.Dataset(InMemoryTable(table))


def _missing_message(path, name, split, reason):
    subset = f", '{name}'" if name else ""
    where = os.path.join(local_dataset_dir(path, name), split)
    return (f"Dataset {path} (subset {name or 'default'}, split {split}) is not available: {reason}\n"
            f"Fix it in one of two ways:\n"
            f"  1. on a machine with network access, fill the HuggingFace cache and copy it here "
            f"(or unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE):\n"
            f"       python -c \"import datasets; datasets.load_dataset('{path}'{subset}, split='{split}')\"\n"
            f"  2. put the rows (upstream row format) at {where}.parquet or {where}.jsonl "
            f"(or shards in {where}/); `python -m tasks.common --only {path}` writes them. "
            f"The folder is $NANOCHAT_TASKS_DIR, default <base_dir>/task_data.")


_TRUE = ("1", "ON", "YES", "TRUE")
_hub_reachable = None  # None until checked: whether the hub's host answered, once per process


def _hub_offline_requested():
    return any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _check_hub(timeout=3.0):
    """Whether a TCP connection to the hub's host (HF_ENDPOINT, default huggingface.co) opens within `timeout`."""
    import socket
    import urllib.parse

    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _settle_hub_mode():
    """Put `datasets` in offline mode (it still reads what the HuggingFace cache holds) when the hub must not or
    cannot be used. `datasets` reads HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, when it is imported, so a variable
    set later would be ignored; and without the network, every dataset would first sit through the hub client's
    retries (tens of seconds each). So the variables are read at each call, and the hub is probed once per process.
    """
    global _hub_reachable
    offline = _hub_offline_requested()
    if not offline:
        if _hub_reachable is None:
            _hub_reachable = _check_hub()
            if not _hub_reachable:
                logger.warning("The HuggingFace hub can't be reached: task datasets come from the local tasks folder or "
                               "the HuggingFace cache only, for the rest of this run")
        offline = not _hub_reachable
    import datasets.config
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = offline
    huggingface_hub.constants.HF_HUB_OFFLINE = offline


def load_hf_dataset(path, name=None, split="train", data_files=None, shuffle_seed=SHUFFLE_SEED):
    """Rows of a task dataset as a datasets.Dataset, shuffled with `shuffle_seed` (None = file order).

    Looks, in order, at: `data_files` (explicit local parquet/jsonl files), the local tasks folder
    (see local_tasks_dir), then the HuggingFace hub via datasets.load_dataset(path, name, split=split).
    The shuffle is datasets' own (numpy default_rng(seed).permutation), as upstream.
    Raises DatasetUnavailableError naming the dataset and the fix when none of them has it.
    """
    if data_files is not None:
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        missing = [str(f) for f in files if not os.path.isfile(f)]
        if missing:
            raise DatasetUnavailableError(_missing_message(path, name, split, f"data_files not found: {missing}"))
        ds = _read_local([str(f) for f in files])
    elif files := _local_files(path, name, split):
        ds = _read_local(files)
    else:
        import datasets

        _settle_hub_mode()
        try:
            ds = datasets.load_dataset(path, name, split=split)
        except OSError as e:  # ConnectionError, offline mode, missing repo or file: all OSError subclasses
            raise DatasetUnavailableError(_missing_message(path, name, split, f"{type(e).__name__}: {e}")) from e
    return ds if shuffle_seed is None else ds.shuffle(seed=shuffle_seed)


# -----------------------------------------------------------------------------
# Offline stand-ins: what was used instead of data that could not be had

# key -> one-line description, in the order first used. Process-wide on purpose: a training script asks
# at the end which stand-ins any of its tasks used, to say so in its report section.
_fallbacks = {}


def note_fallback(key, description, detail=""):
    """Record that a stand-in replaced missing data; logs a warning the first time `key` is noted.

    `description` is the one line fallbacks_used() reports; `detail` (why, and how to get the real data)
    only goes to the log. Returns True the first time, False after.
    """
    if key in _fallbacks:
        return False
    _fallbacks[key] = description
    logger.warning("%s%s", description, f"\n{detail}" if detail else "")
    return True


def fallbacks_used():
    """One-line descriptions of every stand-in used so far in this process, in the order first used."""
    return list(_fallbacks.values())


# Rows per GSM8K split (both subsets), so the synthetic stand-in keeps a mixture's proportions.
GSM8K_SIZES = {"train": 7473, "test": 1319}


def gsm8k_or_synthetic(split, subset="main", size=None, seed=0, **kwargs):
    """GSM8K(subset, split), or, when it can't be had, SyntheticArithmetic(size, split, seed).

    `size` defaults to the GSM8K split's own size; `kwargs` (start/stop/step) go to either task. The
    fallback is logged once per (subset, split) and listed by fallbacks_used().
    """
    from tasks.arithmetic import SyntheticArithmetic
    from tasks.gsm8k import GSM8K

    try:
        return GSM8K(subset, split, **kwargs)
    except DatasetUnavailableError as e:
        size = GSM8K_SIZES[split] if size is None else size
        note_fallback(f"gsm8k/{subset}/{split}",
                      f"GSM8K {subset}/{split} unavailable offline: {size:,} synthetic arithmetic problems "
                      f"(tasks/arithmetic.py) used instead",
                      str(e))
        return SyntheticArithmetic(size=size, split=split, seed=seed, **kwargs)


# Every (path, subset, split) nanochat's stages read, for the offline export below.
KNOWN_DATASETS = [
    *[("allenai/ai2_arc", subset, split) for subset in ("ARC-Easy", "ARC-Challenge") for split in ("train", "validation", "test")],
    *[("cais/mmlu", "all", split) for split in ("auxiliary_train", "validation", "dev", "test")],
    *[("openai/gsm8k", "main", split) for split in ("train", "test")],
    ("openai/openai_humaneval", "openai_humaneval", "test"),
    *[("HuggingFaceTB/smol-smoltalk", None, split) for split in ("train", "test")],
]


def export_dataset(path, name, split, out_dir):
    """Fetch one split from the hub (unshuffled) and write it as <out_dir>/<org>--<name>/<subset>/<split>.parquet."""
    import io

    import pyarrow.parquet as pq

    from nanochat.common import atomic_write

    ds = load_hf_dataset(path, name, split, shuffle_seed=None)
    target = os.path.join(local_dataset_dir(path, name, root=out_dir), f"{split}.parquet")
    buf = io.BytesIO()
    pq.write_table(ds.data.table, buf)
    atomic_write(target, buf.getvalue())
    logger.info("wrote %d rows of %s/%s/%s to %s", len(ds), path, name or "default", split, target)
    return target


def build_parser():
    parser = argparse.ArgumentParser(description="Download nanochat's task datasets into a local folder for offline use.")
    parser.add_argument("--out-dir", default=None, help="destination (default: $NANOCHAT_TASKS_DIR or <base_dir>/task_data)")
    parser.add_argument("--only", action="append", default=None, help="dataset path to export (repeatable), e.g. openai/gsm8k")
    return parser


def main(argv=None):
    from nanochat.common import setup_default_logging

    setup_default_logging()
    args = build_parser().parse_args(argv)
    out_dir = args.out_dir or local_tasks_dir()
    wanted = [d for d in KNOWN_DATASETS if args.only is None or d[0] in args.only]
    if not wanted:
        known = sorted({d[0] for d in KNOWN_DATASETS})
        raise SystemExit(f"--only matched no dataset; known: {', '.join(known)}")
    for path, name, split in wanted:
        export_dataset(path, name, split, out_dir)


if __name__ == "__main__":
    main()
