"""
The CORE metric (DCLM's low-variance ICL suite, 22 tasks): a base model's quality as one number, the mean
over tasks of accuracy centered on the random-guess baseline. An example is scored by the log-likelihood
of its options (multiple_choice, schema) or by greedy exact match of a continuation (language_modeling).
With max_per_task=-1 and prompts that fit the context, the scores are upstream's.

    out = evaluate_core(model, tokenizer, device, max_per_task=500)   # out["core_metric"], out["results"]

`python -m scripts.base_eval --eval core` runs it on a checkpoint, downloading the eval bundle on first use
($NANOCHAT_EVAL_BUNDLE_URL: a mirror); tests: tests/test_core_eval.py.
"""

import csv
import json
import logging
import os
import random
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import UserError, dist_world_size, download_file_with_lock, get_base_dir

log = logging.getLogger(__name__)

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
EVAL_BUNDLE_URL_ENV = "NANOCHAT_EVAL_BUNDLE_URL"
BUNDLE_FILES = ("core.yaml", "eval_meta_data.csv")  # plus the eval_data/ folder

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DATA_SEED = 1337  # shuffles each task's examples before any truncation
FEWSHOT_SEED = 1234  # example idx draws its few-shot examples with random.Random(FEWSHOT_SEED + idx)
FEWSHOT_SEPARATOR = "\n\n"
# Token budget (rows x padded length) of one forward pass: several examples per forward, where upstream ran
# one. On CUDA small forwards leave the GPU idle, and 8192 tokens of fp32 logits at a 32K vocab (1 GiB) is what
# one 4-option example at a 2048 context needs anyway. CPU forwards are compute-bound (bench/bench_core_eval.py:
# 0.83x-1.28x, within the noise), so a smaller budget keeps the full-logits path's (B, T, V) at 256 MiB.
DEFAULT_BATCH_TOKENS = {"cuda": 8192}
DEFAULT_BATCH_TOKENS_OTHER = 2048
PREPARE_CHUNK = 256  # examples tokenised at a time: bounds host memory on 10K-example tasks

# The 22 CORE tasks in report order: (label, type, shots, delimiter, random baseline %, examples). The bundle
# rules; this table warns when it differs from the suite behind published CORE numbers (GPT-2 124M 0.1139).
REFERENCE_TASKS = (
    ("hellaswag_zeroshot", "multiple_choice", 0, " ", 25.0, 10042),
    ("jeopardy", "language_modeling", 10, "\nAnswer: ", 0.0, 2117),
    ("bigbench_qa_wikidata", "language_modeling", 10, " ", 0.0, 20321),
    ("arc_easy", "multiple_choice", 10, "\nAnswer: ", 25.0, 2376),
    ("arc_challenge", "multiple_choice", 10, "\nAnswer: ", 25.0, 1172),
    ("copa", "multiple_choice", 0, " ", 50.0, 100),
    ("commonsense_qa", "multiple_choice", 10, " ", 20.0, 1221),
    ("piqa", "multiple_choice", 10, "\nAnswer: ", 50.0, 1838),
    ("openbook_qa", "multiple_choice", 0, " ", 25.0, 500),
    ("lambada_openai", "language_modeling", 0, " ", 0.0, 5153),
    ("hellaswag", "multiple_choice", 10, " ", 25.0, 10042),
    ("winograd", "schema", 0, " ", 50.0, 273),
    ("winogrande", "schema", 0, " ", 50.0, 1267),
    ("bigbench_dyck_languages", "language_modeling", 10, " ", 0.0, 1000),
    ("agi_eval_lsat_ar", "multiple_choice", 3, " ", 20.0, 230),
    ("bigbench_cs_algorithms", "language_modeling", 10, " ", 0.0, 1320),
    ("bigbench_operators", "language_modeling", 10, " ", 0.0, 210),
    ("bigbench_repeat_copy_logic", "language_modeling", 10, " ", 0.0, 32),
    ("squad", "language_modeling", 10, " ", 0.0, 10570),
    ("coqa", "language_modeling", 0, " ", 0.0, 7983),
    ("boolq", "multiple_choice", 10, "\nAnswer: ", 62.0, 3270),
    ("bigbench_language_identification", "multiple_choice", 10, " ", 9.1, 10000),
)


class EvalBundleError(UserError, RuntimeError):
    """The eval bundle can't be downloaded, unpacked or read; the message says what to do."""


def _bundle_root_in_zip(names):
    """The folder prefix inside the zip that holds core.yaml (upstream's zip has one top folder, eval_bundle/)."""
    names = set(names)
    candidates = sorted((n[: -len("core.yaml")] for n in names if n.endswith("core.yaml")
                         and (n == "core.yaml" or n.endswith("/core.yaml"))), key=len)
    for prefix in candidates:
        has_data = any(n.startswith(prefix + "eval_data/") for n in names)
        if prefix + "eval_meta_data.csv" in names and has_data:
            return prefix
    return None


def _unpack_bundle(zip_path, bundle_dir):  # into a temp dir beside bundle_dir, then one rename into place
    try:
        with zipfile.ZipFile(zip_path) as zf:
            prefix = _bundle_root_in_zip(zf.namelist())
            if prefix is None:
                raise EvalBundleError(f"{zip_path} is a zip but has no core.yaml + eval_meta_data.csv + eval_data/; "
                                      f"delete it and re-run (or point {EVAL_BUNDLE_URL_ENV} at a real eval bundle)")
            tmp = tempfile.mkdtemp(dir=os.path.dirname(bundle_dir), prefix=".eval_bundle.")
            try:
                zf.extractall(tmp)  # extractall drops absolute paths and '..' parts (no zip-slip)
                os.replace(os.path.join(tmp, prefix), bundle_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except zipfile.BadZipFile as e:
        raise EvalBundleError(f"{zip_path} is not a valid zip ({e}); delete it and re-run to download it again") from e
    log.info("Unpacked the eval bundle to %s", bundle_dir)


def ensure_eval_bundle():
    """Path of <base>/eval_bundle, downloaded (file-locked) and unpacked first if needed; raises EvalBundleError."""
    from filelock import FileLock

    bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
    if not os.path.isdir(bundle_dir):
        url = os.environ.get(EVAL_BUNDLE_URL_ENV) or EVAL_BUNDLE_URL
        try:
            zip_path = download_file_with_lock(url, "eval_bundle.zip", desc="eval bundle")
        except RuntimeError as e:
            raise EvalBundleError(f"eval bundle unavailable: {e}") from e
        # A separate lock: other ranks may find the zip already there and must not unpack it concurrently.
        with FileLock(bundle_dir + ".lock"):
            if not os.path.isdir(bundle_dir):
                _unpack_bundle(zip_path, bundle_dir)
    missing = [f for f in BUNDLE_FILES if not os.path.isfile(os.path.join(bundle_dir, f))]
    if not os.path.isdir(os.path.join(bundle_dir, "eval_data")):
        missing.append("eval_data/")
    if missing:
        raise EvalBundleError(f"{bundle_dir} lacks {', '.join(missing)}; delete that folder and re-run to unpack it again")
    return bundle_dir


@dataclass(frozen=True)
class TaskSpec:
    """One CORE task as the bundle describes it."""

    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    dataset_uri: str  # relative to <bundle>/eval_data
    random_baseline: float  # percent


def load_task_specs(bundle_dir):
    """Tasks of core.yaml (in its order) joined with their random baselines from eval_meta_data.csv."""
    import yaml

    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise EvalBundleError(f"{bundle_dir}/core.yaml has no 'icl_tasks' list")
    baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            row = {(k or "").strip(): v.strip() for k, v in row.items() if isinstance(v, str)}
            if "Eval Task" not in row or "Random baseline" not in row:
                raise EvalBundleError(f"{bundle_dir}/eval_meta_data.csv needs the columns 'Eval Task' and 'Random baseline'")
            baselines[row["Eval Task"]] = row["Random baseline"]  # parsed below, only for the tasks we run
    specs = []
    for task in config["icl_tasks"]:
        if not isinstance(task, dict):
            raise EvalBundleError(f"{bundle_dir}/core.yaml: every icl_tasks entry must be a mapping, got {task!r}")
        label = task.get("label")
        missing = [k for k in ("label", "icl_task_type", "num_fewshot", "dataset_uri") if k not in task]
        if missing:
            raise EvalBundleError(f"{bundle_dir}/core.yaml: task {label!r} lacks {', '.join(missing)}")
        try:
            baseline = float(baselines[label])
        except (KeyError, ValueError):
            raise EvalBundleError(f"{bundle_dir}/eval_meta_data.csv has no 'Random baseline' row for task {label!r} "
                                  f"(or it is not a number: {baselines.get(label)!r})") from None
        shots = task["num_fewshot"]
        spec = TaskSpec(label=label, task_type=task["icl_task_type"], num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                        delimiter=task.get("continuation_delimiter", " "), dataset_uri=task["dataset_uri"],
                        random_baseline=baseline)
        if spec.task_type not in TASK_TYPES:
            raise EvalBundleError(f"task {label!r} has icl_task_type {spec.task_type!r}; supported: {', '.join(TASK_TYPES)}")
        specs.append(spec)
    return specs


def compare_with_reference(specs):
    """Human-readable differences between the bundle's tasks and the 22 reference CORE tasks ([] = same)."""
    ref = {r[0]: r for r in REFERENCE_TASKS}
    diffs = []
    labels = [s.label for s in specs]
    if labels != [r[0] for r in REFERENCE_TASKS]:
        missing = [r[0] for r in REFERENCE_TASKS if r[0] not in labels]
        extra = [lab for lab in labels if lab not in ref]
        diffs.append(f"task list differs (missing: {missing or 'none'}, extra: {extra or 'none'}, or a different order)")
    for s in specs:
        if s.label in ref:
            _, typ, shots, delim, baseline, _ = ref[s.label]
            if (s.task_type, s.num_fewshot, s.delimiter, s.random_baseline) != (typ, shots, delim, baseline):
                diffs.append(f"{s.label}: {s.task_type}/{s.num_fewshot}-shot/{s.delimiter!r}/{s.random_baseline}% "
                             f"vs reference {typ}/{shots}-shot/{delim!r}/{baseline}%")
    return diffs


_REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


def load_task_data(bundle_dir, spec):
    """The task's JSONL rows, shuffled with random.Random(DATA_SEED) (upstream's order)."""
    path = os.path.join(bundle_dir, "eval_data", spec.dataset_uri)
    if not os.path.isfile(path):
        raise EvalBundleError(f"task {spec.label!r}: data file {path} is missing from the eval bundle")
    data = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in _REQUIRED_FIELDS[spec.task_type] if k not in row]
            if missing:
                raise EvalBundleError(f"{path}:{lineno}: a {spec.task_type} row needs {', '.join(missing)}")
            data.append(row)
    random.Random(DATA_SEED).shuffle(data)
    return data


class _AllBut(Sequence):
    """range(n) without `skip`, unbuilt: rng.sample draws from it what it would from the list, in O(k) not O(n)."""

    def __init__(self, n, skip):
        self.n, self.skip = n, skip

    def __len__(self):
        return self.n - 1

    def __getitem__(self, i):
        if not 0 <= i < self.n - 1:
            raise IndexError(i)
        return i if i < self.skip else i + 1


def fewshot_indices(num_items, idx, num_fewshot):
    """Indices of the few-shot examples of item `idx`: a seeded draw from every other item of the task."""
    # From the whole task (upstream drew from the truncated list), so max_per_task never changes a prompt.
    if num_fewshot <= 0:
        return []
    if num_items - 1 < num_fewshot:
        raise ValueError(f"{num_fewshot}-shot prompts need at least {num_fewshot + 1} examples in the task, it has {num_items}")
    return random.Random(FEWSHOT_SEED + idx).sample(_AllBut(num_items, idx), num_fewshot)


def render_prompts(item, fewshot, task_type, delimiter):
    """Prompt strings of one example: one per choice / context option; (without, with) for language modeling."""
    if task_type == "multiple_choice":
        prefix = "".join(fs["query"] + delimiter + fs["choices"][fs["gold"]] + FEWSHOT_SEPARATOR for fs in fewshot)
        return [prefix + item["query"] + delimiter + choice for choice in item["choices"]]
    if task_type == "schema":
        prefix = "".join(fs["context_options"][fs["gold"]] + delimiter + fs["continuation"] + FEWSHOT_SEPARATOR for fs in fewshot)
        return [prefix + option + delimiter + item["continuation"] for option in item["context_options"]]
    if task_type == "language_modeling":
        prefix = "".join(fs["context"].strip() + delimiter + fs["continuation"] + FEWSHOT_SEPARATOR for fs in fewshot)
        head = prefix + item["context"].strip() + delimiter
        # Stripping drops the delimiter's trailing space from the context, so it is scored as part of the
        # first continuation token (" Paris"), the way BPE would have tokenised the full text.
        return [head.strip(), head + item["continuation"]]
    raise ValueError(f"unknown task type {task_type!r}")


@dataclass
class PreparedExample:
    """Token rows of one example and, per row, the span [start, end) of tokens that is scored."""

    index: int
    seqs: list
    starts: list
    ends: list
    gold: int  # -1 for language modeling (the single row must be predicted exactly)


def _common_prefix_len(seqs):
    # The common prefix of a set is that of its lexicographic min and max: no Python loop per token.
    lo, hi = min(seqs), max(seqs)
    n = min(len(lo), len(hi))
    mismatch = np.flatnonzero(np.asarray(lo[:n]) != np.asarray(hi[:n]))
    return int(mismatch[0]) if mismatch.size else n


def _common_suffix_len(seqs):
    return _common_prefix_len([s[::-1] for s in seqs])


def token_spans(seqs, task_type, label="", index=-1):
    """(rows, starts, ends) for the encoded prompts of one example (each starts with BOS): the scored span
    [start, end) of each row keeps at least one token, even for identical options."""
    if task_type == "multiple_choice":  # what follows the options' common prefix
        start = min(_common_prefix_len(seqs), min(len(s) for s in seqs) - 1)
        return seqs, [start] * len(seqs), [len(s) for s in seqs]
    if task_type == "schema":  # the common suffix: the continuation after each context option
        suffix = min(_common_suffix_len(seqs), min(len(s) for s in seqs) - 1)
        return seqs, [len(s) - suffix for s in seqs], [len(s) for s in seqs]
    if task_type == "language_modeling":
        without, with_ = seqs
        if not (len(without) < len(with_) and with_[: len(without)] == without):
            raise ValueError(f"task {label!r} example {index}: the context's tokens are not a prefix of the context+continuation "
                             f"tokens ({len(without)} vs {len(with_)}); the tokenizer merges across the delimiter")
        return [with_], [len(without)], [len(with_)]
    raise ValueError(f"unknown task type {task_type!r}")


def crop_to_context(seqs, starts, ends, max_seq_len):
    """Keep the last `max_seq_len` tokens of each row (upstream never cropped), shifting its span."""
    if max_seq_len is None:
        return seqs, starts, ends
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 to score anything, got {max_seq_len}")
    crops = [max(0, len(seq) - max_seq_len) for seq in seqs]
    return ([seq[c:] for seq, c in zip(seqs, crops)],
            [max(a - c, 1) for a, c in zip(starts, crops)],  # the first kept token has no prediction
            [b - c for b, c in zip(ends, crops)])


def prepare_examples(tokenizer, data, indices, spec, max_seq_len=None):
    """Render, tokenise (one batched encode call, BOS first) and span every example in `indices`."""
    prompts = [render_prompts(data[i], [data[j] for j in fewshot_indices(len(data), i, spec.num_fewshot)],
                              spec.task_type, spec.delimiter) for i in indices]
    flat = [p for ps in prompts for p in ps]
    encoded = tokenizer.encode(flat, prepend=tokenizer.get_bos_token_id()) if flat else []
    out, k = [], 0
    for i, ps in zip(indices, prompts):
        seqs = encoded[k: k + len(ps)]
        k += len(ps)
        seqs, starts, ends = token_spans(seqs, spec.task_type, spec.label, i)
        seqs, starts, ends = crop_to_context(seqs, starts, ends, max_seq_len)
        gold = -1 if spec.task_type == "language_modeling" else int(data[i]["gold"])
        out.append(PreparedExample(i, seqs, starts, ends, gold))
    return out


def plan_batches(examples, batch_tokens):
    """Group whole examples so rows x longest row <= batch_tokens (an example past it alone; <= 0: one each)."""
    # Longest first: similar lengths share a batch (little padding) and the biggest forward comes first.
    order = sorted(examples, key=lambda ex: max(len(s) for s in ex.seqs), reverse=True)
    batches, current, rows, width = [], [], 0, 0
    for ex in order:
        ex_rows, ex_width = len(ex.seqs), max(len(s) for s in ex.seqs)
        fits = batch_tokens > 0 and (rows + ex_rows) * max(width, ex_width) <= batch_tokens
        if current and not fits:
            batches.append(current)
            current, rows, width = [], 0, 0
        current.append(ex)
        rows, width = rows + ex_rows, max(width, ex_width)
    if current:
        batches.append(current)
    return batches


def scores_positions_only(model):
    """Whether `model` has hidden_states(idx) -> (B, T, d) and logits(x) -> (..., V), as nanochat's GPT does."""
    return callable(getattr(model, "hidden_states", None)) and callable(getattr(model, "logits", None))


@torch.no_grad()
def score_batch(model, examples, device, pad_token_id, full_logits=False):
    """One forward over every row of `examples`, right-padded with `pad_token_id` (causal: padding never reaches
    earlier positions); returns [(correct, per-row mean losses)] per example. full_logits=True runs the head at
    every position: upstream's way, the reference with the same scores."""
    rows = [(seq, a, b) for ex in examples for seq, a, b in zip(ex.seqs, ex.starts, ex.ends)]
    width = max(len(seq) for seq, _, _ in rows)
    row_idx, pos_idx = [], []
    for r, (seq, a, b) in enumerate(rows):
        row_idx.extend([r] * (b - a))
        pos_idx.extend(range(a - 1, b - 1))  # logits at t predict token t + 1
    ids = torch.tensor([seq + [pad_token_id] * (width - len(seq)) for seq, _, _ in rows], dtype=torch.long).to(device)
    row_t = torch.tensor(row_idx, dtype=torch.long, device=device)
    pos_t = torch.tensor(pos_idx, dtype=torch.long, device=device)
    if full_logits or not scores_positions_only(model):
        picked = model(ids)[row_t, pos_t].float()  # (B, T, V) -> (N, V): only the scored positions
    else:  # the head is most of a small model's FLOPs and its (B, T, V) fp32 output most of the memory
        hidden = model.hidden_states(ids)  # (B, T, d)
        picked = model.logits(hidden[row_t, pos_t]).float()  # (N, d) -> (N, V)
    targets = ids[row_t, pos_t + 1]  # (N,)
    nll = F.cross_entropy(picked, targets, reduction="none")
    miss = (picked.argmax(dim=-1) != targets).float()
    loss_sum = torch.zeros(len(rows), device=device).index_add_(0, row_t, nll)
    miss_sum = torch.zeros(len(rows), device=device).index_add_(0, row_t, miss)
    counts = torch.tensor([b - a for _, a, b in rows], dtype=torch.float32, device=device)
    mean_loss = (loss_sum / counts).tolist()
    misses = miss_sum.tolist()
    out, r = [], 0
    for ex in examples:
        n = len(ex.seqs)
        losses = mean_loss[r: r + n]
        if ex.gold < 0:
            correct = misses[r] == 0  # greedy decoding reproduces every continuation token
        else:
            correct = min(range(n), key=lambda j: (losses[j], j)) == ex.gold  # argmin, first on ties
        out.append((correct, losses))
        r += n
    return out


def default_batch_tokens(device):
    """The forward-pass token budget used when none is given (see DEFAULT_BATCH_TOKENS)."""
    return DEFAULT_BATCH_TOKENS.get(torch.device(device).type, DEFAULT_BATCH_TOKENS_OTHER)


def evaluate_task(model, tokenizer, data, device, spec, num_examples=None, max_seq_len=None,
                  batch_tokens=None, rank=None, world_size=None, full_logits=False):
    """0/1 correctness (float tensor, length num_examples) of the first `num_examples` items of `data`, strided
    over ranks. With rank/world_size None they come from the process group and every rank gets the all-reduced
    vector; given explicitly, only that share is scored and returned (zeros elsewhere)."""
    n = len(data) if num_examples is None else min(num_examples, len(data))
    reduce = rank is None and world_size is None
    if rank is None or world_size is None:
        world_size = dist_world_size() if reduce else 1
        rank = dist.get_rank() if world_size > 1 else 0
    if batch_tokens is None:
        batch_tokens = default_batch_tokens(device)
    correct = [0.0] * n
    mine = list(range(rank, n, world_size))
    pad = tokenizer.get_bos_token_id()
    for c in range(0, len(mine), PREPARE_CHUNK):
        examples = prepare_examples(tokenizer, data, mine[c: c + PREPARE_CHUNK], spec, max_seq_len)
        for batch in plan_batches(examples, batch_tokens):
            for ex, (ok, _) in zip(batch, score_batch(model, batch, device, pad, full_logits)):
                correct[ex.index] = float(ok)
    correct = torch.tensor(correct, dtype=torch.float32, device=device)
    if reduce and world_size > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct


def centered_accuracy(accuracy, baseline):
    """Accuracy (a fraction) rescaled so that the random-guess baseline scores 0 and a perfect score 1."""
    if not 0 <= baseline < 1:
        raise ValueError(f"baseline must be a fraction in [0, 1), got {baseline}")
    return (accuracy - baseline) / (1 - baseline)


def evaluate_core(model, tokenizer, device, max_per_task=-1, bundle_dir=None, max_seq_len=None, batch_tokens=None,
                  full_logits=False):
    """Every task of the eval bundle; returns {"results", "centered_results", "core_metric"}. All ranks call it.
    model(idx) -> logits (B, T, V); max_per_task > 0 scores the first that many (shuffled) examples per task;
    max_seq_len defaults to the model's context, batch_tokens to default_batch_tokens(device)."""
    bundle_dir = bundle_dir or ensure_eval_bundle()
    specs = load_task_specs(bundle_dir)
    for diff in compare_with_reference(specs):
        log.warning("Eval bundle differs from the reference CORE suite (scores not comparable to published ones): %s", diff)
    if max_seq_len is None:
        max_seq_len = getattr(model, "max_seq_len", None) or getattr(getattr(model, "config", None), "sequence_len", None)
    if not full_logits and not scores_positions_only(model):
        log.info("%s has no hidden_states()/logits(): scoring from its full (B, T, V) logits", type(model).__name__)
    results, centered = {}, {}
    for spec in specs:
        t0 = time.time()
        data = load_task_data(bundle_dir, spec)
        n = len(data) if max_per_task is None or max_per_task <= 0 else min(max_per_task, len(data))
        correct = evaluate_task(model, tokenizer, data, device, spec, num_examples=n, max_seq_len=max_seq_len,
                                batch_tokens=batch_tokens, full_logits=full_logits)
        accuracy = correct.mean().item() if n else float("nan")
        results[spec.label] = accuracy
        centered[spec.label] = centered_accuracy(accuracy, 0.01 * spec.random_baseline)  # the bundle gives percent
        log.info("Evaluating: %s (%d-shot, type: %s)... accuracy: %.4f | centered: %.4f | time: %.2fs",
                 spec.label, spec.num_fewshot, spec.task_type, accuracy, centered[spec.label], time.time() - t0)
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered_results": centered, "core_metric": core}


def format_results_csv(results, centered_results, core_metric):
    """The per-task CSV that base_eval writes (fixed-width columns, CORE as the last row)."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n"]
    for label, acc in results.items():
        lines.append(f"{label:<35}, {acc:<10.6f}, {centered_results[label]:<10.6f}\n")
    lines.append(f"{'CORE':<35}, {'':<10}, {core_metric:<10.6f}\n")
    return "".join(lines)
