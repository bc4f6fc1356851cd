"""
What every task shares: the `Task` view and its mixtures, the multiple-choice and "#### n" task kinds, the
conversation check, `load_hf_dataset` (the one place rows come from), and the offline stand-ins, each logged
once and listed by fallbacks_used() for the training report.

Offline, rows (upstream row format) are read from $NANOCHAT_TASKS_DIR (default <base_dir>/task_data) as
<org>--<name>/<subset or "default">/<split>.parquet|.jsonl or a <split>/ folder of shards, which this writes:

    python -m tasks.common [--out-dir /data/nanochat_tasks] [--only allenai/ai2_arc]
"""

import abc
import argparse
import array
import bisect
import glob
import io
import itertools
import logging
import math
import operator
import os
import random
import re
import socket
import urllib.parse

from nanochat.common import UserError, atomic_write, get_base_dir, setup_default_logging

logger = logging.getLogger(__name__)

SHUFFLE_SEED = 42  # every task dataset is shuffled with this seed, as upstream


class DatasetUnavailableError(UserError, RuntimeError):
    """A task dataset could not be found locally nor fetched from the hub."""


def check_one_of(what, value, allowed):
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


# -----------------------------------------------------------------------------
# Task views


class Task(abc.ABC):
    """Examples start, start+step, ... (< stop) of a task's data, each a conversation dict:
    {"messages": [{"role": "user"|"assistant"|"system", "content": str | [{"type": "text"|"python"|"python_output",
    "text": str}, ...]}], ...}. Evaluation tasks set eval_type ("categorical" | "generative") and implement evaluate()."""

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
        raise TypeError(f"{type(self).__name__} is a training-only task: it has no evaluate()")

    def reward(self, conversation, response):
        """RL reward: evaluate() as a float (1.0 right, 0.0 wrong)."""
        return float(self.evaluate(conversation, response))

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
        self.offsets = [0, *itertools.accumulate(len(task) for task in self.tasks)]  # offsets[k]: task k's first index

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        task_index = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[task_index][index - self.offsets[task_index]]


class TaskMixture(TaskSequence):
    """All examples of all tasks in one fixed shuffled order; pass a task twice to see it twice per epoch."""

    def __init__(self, tasks, **kwargs):
        super().__init__(tasks, **kwargs)
        # Upstream shuffles (task, local index) pairs; a shuffle permutes positions alike whatever the items
        # are, so shuffling global indices gives its order without a tuple per example.
        order = list(range(self.offsets[-1]))
        random.Random(SHUFFLE_SEED).shuffle(order)
        self.order = array.array("q", order)  # 8 bytes per example instead of a Python int object each

    def get_example(self, index):
        return super().get_example(self.order[index])


class GeneratedTask(Task):
    """`size` examples made up on the fly for one split (nothing to download)."""

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        check_one_of("split", split, ("train", "test"))
        self.size, self.split = size, split

    def num_examples(self):
        return self.size


# -----------------------------------------------------------------------------
# Task kinds: how a conversation is shaped and scored


def render_mc(question, letters, choices):
    """The multiple-choice prompt of every categorical task."""
    if len(letters) != len(choices):
        raise ValueError(f"got {len(letters)} letters for {len(choices)} choices")
    # The letter follows its choice with no space ("- Paris=A"): the prompt holds exactly the answer's token
    # ("A", not " A"), which makes binding choice to letter easier for small models.
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


class MultipleChoiceTask(Task):
    """Rows of `self.ds` asked through render_mc and answered by one letter; subclasses give mc_row()."""

    eval_type = "categorical"

    @abc.abstractmethod
    def mc_row(self, row, index):
        """(question, letters, choices, answer letter, extra conversation keys) of one dataset row."""

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        question, letters, choices, answer, extra = self.mc_row(self.ds[index], index)
        return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                             {"role": "assistant", "content": answer}],
                **extra, "letters": letters}

    def evaluate(self, conversation, response):
        # The caller picks among the letters (chateval compares only their logits), so anything else is its bug.
        if response not in conversation["letters"]:
            raise ValueError(f"response {response!r} is not one of the letters {conversation['letters']}")
        return response == conversation["messages"][-1]["content"]


ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text):
    """The number after '#### ' (first match, commas removed), or None; as GSM8K's official grader."""
    match = ANSWER_RE.search(text)
    return None if match is None else match.group(1).strip().replace(",", "")


class FinalAnswerTask(Task):
    """Tasks whose reference assistant parts end in "#### n" (GSM8K's format), scored on that number."""

    eval_type = "generative"

    def evaluate(self, conversation, response):
        """1 if the response's '#### n' equals the reference's, else 0. Exact strings: "18" != "18.00", as upstream."""
        if not isinstance(response, str):
            raise TypeError(f"response must be a str, got {type(response).__name__}")
        parts = conversation["messages"][-1]["content"]
        if not isinstance(parts, list):
            raise TypeError("the reference assistant message must be a list of parts")
        reference = extract_answer(parts[-1]["text"])
        if reference is None:
            raise ValueError(f"reference answer has no '#### <number>' line: {parts[-1]['text']!r}")
        return int(extract_answer(response) == reference)


def validate_messages(messages, where, system_ok=False):
    """Raise ValueError naming `where` unless `messages` is a chat: an optional system message (if `system_ok`),
    then user and assistant alternating, at least one of each, string contents."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: expected a JSON array of messages, got {type(messages).__name__}")
    first = 1 if system_ok and messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    if len(messages) - first < 2:
        raise ValueError(f"{where}: need at least 2 messages (a user and an assistant one), got {len(messages) - first}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {i} needs 'role' and 'content'")
        expected = "system" if i < first else "user" if (i - first) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"{where}: message {i} is from {message['role']!r}, expected {expected!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {i} content must be a string, got {type(message['content']).__name__}")


# -----------------------------------------------------------------------------
# Loading datasets


def local_tasks_dir():
    """Where local copies of task datasets live: $NANOCHAT_TASKS_DIR, else <base_dir>/task_data."""
    return os.environ.get("NANOCHAT_TASKS_DIR") or os.path.join(get_base_dir(), "task_data")


def local_dataset_dir(path, name=None, root=None):
    """<root>/<org>--<name>/<subset or 'default'>: the folder holding one subset's split files."""
    return os.path.join(root or local_tasks_dir(), path.replace("/", "--"), name or "default")


def _local_files(path, name, split):
    folder = local_dataset_dir(path, name)
    for ext in ("parquet", "jsonl", "json"):
        single = os.path.join(folder, f"{split}.{ext}")
        if os.path.isfile(single):
            return [single]
        if shards := sorted(glob.glob(os.path.join(folder, split, f"*.{ext}"))):
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


_hub_reachable = None  # None until checked: whether the hub's host answered, once per process


def _check_hub(timeout=3.0):
    """Whether a TCP connection to the hub's host (HF_ENDPOINT, default huggingface.co) opens within `timeout`."""
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _settle_hub_mode():
    """Put `datasets` offline (it still reads the HuggingFace cache) when the hub must not or cannot be used."""
    global _hub_reachable
    # Read at each call: `datasets` reads these variables once, at import, and would miss one set later.
    offline = any(os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
                  for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline:
        if _hub_reachable is None:  # probed once: without network each dataset would sit through tens of seconds of retries
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
    """Rows of `data_files`, else of the local tasks folder's copy, else of the hub's dataset, as a datasets.Dataset
    shuffled with `shuffle_seed` (None = file order); DatasetUnavailableError naming the fix when none has them."""
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
    # datasets' own shuffle (numpy default_rng(seed).permutation), as upstream.
    return ds if shuffle_seed is None else ds.shuffle(seed=shuffle_seed)


# -----------------------------------------------------------------------------
# Offline stand-ins: what was used instead of data that could not be had

# key -> one-line description, in the order first used. Process-wide on purpose: a training script asks
# at the end which stand-ins any of its tasks used, to say so in its report section.
_fallbacks = {}


def note_fallback(key, description, detail=""):
    """Record that a stand-in replaced missing data and warn, the first time `key` is noted (then return True).
    `description` is the line fallbacks_used() reports; `detail` (why, how to get the real data) only goes to the log."""
    if key in _fallbacks:
        return False
    _fallbacks[key] = description
    logger.warning("%s%s", description, f"\n{detail}" if detail else "")
    return True


def fallbacks_used():
    """One-line descriptions of every stand-in used so far in this process, in the order first used."""
    return list(_fallbacks.values())


def gsm8k_or_synthetic(split, subset="main", size=None, seed=0, **kwargs):
    """GSM8K(subset, split, **kwargs), or where it can't be had SyntheticArithmetic(size or GSM8K's size, split, seed)."""
    from tasks.arithmetic import SyntheticArithmetic
    from tasks.gsm8k import GSM8K

    try:
        return GSM8K(subset, split, **kwargs)
    except DatasetUnavailableError as e:
        size = {"train": 7473, "test": 1319}[split] if size is None else size  # GSM8K's: a mixture keeps its proportions
        note_fallback(f"gsm8k/{subset}/{split}",
                      f"GSM8K {subset}/{split} unavailable offline: {size:,} synthetic arithmetic problems "
                      f"(tasks/arithmetic.py) used instead",
                      str(e))
        return SyntheticArithmetic(size=size, split=split, seed=seed, **kwargs)


# Every (path, subset, split) nanochat's stages read: what `python -m tasks.common` exports.
KNOWN_DATASETS = [
    *[("allenai/ai2_arc", subset, split) for subset in ("ARC-Easy", "ARC-Challenge") for split in ("train", "validation", "test")],
    *[("cais/mmlu", "all", split) for split in ("auxiliary_train", "validation", "dev", "test")],
    *[("openai/gsm8k", "main", split) for split in ("train", "test")],
    ("openai/openai_humaneval", "openai_humaneval", "test"),
    *[("HuggingFaceTB/smol-smoltalk", None, split) for split in ("train", "test")],
]


def build_parser():
    parser = argparse.ArgumentParser(description="Download nanochat's task datasets into a local folder for offline use.")
    parser.add_argument("--out-dir", default=None, help="destination (default: $NANOCHAT_TASKS_DIR or <base_dir>/task_data)")
    parser.add_argument("--only", action="append", default=None, help="dataset path to export (repeatable), e.g. openai/gsm8k")
    return parser


def main(argv=None):
    import pyarrow.parquet as pq

    setup_default_logging()
    args = build_parser().parse_args(argv)
    out_dir = args.out_dir or local_tasks_dir()
    wanted = [d for d in KNOWN_DATASETS if args.only is None or d[0] in args.only]
    if not wanted:
        known = sorted({d[0] for d in KNOWN_DATASETS})
        raise SystemExit(f"--only matched no dataset; known: {', '.join(known)}")
    for path, name, split in wanted:  # unshuffled, so the local copy is the hub's file order
        ds = load_hf_dataset(path, name, split, shuffle_seed=None)
        target = os.path.join(local_dataset_dir(path, name, root=out_dir), f"{split}.parquet")
        buf = io.BytesIO()
        pq.write_table(ds.data.table, buf)
        atomic_write(target, buf.getvalue())
        logger.info("wrote %d rows of %s/%s/%s to %s", len(ds), path, name or "default", split, target)


if __name__ == "__main__":
    main()
