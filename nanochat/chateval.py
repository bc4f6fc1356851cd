"""
Evaluation of chat models on tasks, and ChatCORE: the library behind scripts/chat_eval.py and SFT's periodic
check. Under torchrun each rank takes a share of the problems and the counts are summed over ranks.
Tests: tests/test_chat_eval.py.

    acc = run_task_eval(build_task("ARC-Easy"), model, tokenizer, engine, batch_size=8)
    score = chatcore({"ARC-Easy": 0.40, ...})   # None unless every task of CHATCORE_TASKS is there
"""

import importlib
import logging
import math
import sys

import torch
import torch.distributed as dist

from nanochat.common import dist_world_size, get_dist_info
from nanochat.core_eval import centered_accuracy
from nanochat.engine import model_device

logger = logging.getLogger("nanochat")

# name -> (module, class, constructor kwargs, random-guess accuracy). Order = evaluation order.
# SpellingBee is part of ChatCORE as in upstream's Mar-2026 version (6 tasks; Oct-2025 and Jul-2026 had 5).
TASKS = {
    "ARC-Easy": ("tasks.arc", "ARC", {"subset": "ARC-Easy", "split": "test"}, 0.25),
    "ARC-Challenge": ("tasks.arc", "ARC", {"subset": "ARC-Challenge", "split": "test"}, 0.25),
    "MMLU": ("tasks.mmlu", "MMLU", {"subset": "all", "split": "test"}, 0.25),
    "GSM8K": ("tasks.gsm8k", "GSM8K", {"subset": "main", "split": "test"}, 0.0),
    "HumanEval": ("tasks.humaneval", "HumanEval", {}, 0.0),
    "SpellingBee": ("tasks.spellingbee", "SpellingBee", {"size": 256, "split": "test"}, 0.0),
}
CHATCORE_TASKS = tuple(TASKS)
# Evaluated only when asked for by name (-a SyntheticArithmetic); not part of ChatCORE nor of the default run.
EXTRA_TASKS = {
    "SyntheticArithmetic": ("tasks.arithmetic", "SyntheticArithmetic", {"size": 1319, "split": "test"}, 0.0),
}
BASELINES = {name: spec[3] for name, spec in TASKS.items()}
CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")


def parse_task_names(spec):
    """'ARC-Easy|GSM8K' -> ["ARC-Easy", "GSM8K"]; None or "" -> every task of TASKS; raises ValueError."""
    if not spec:
        return list(TASKS)
    names = [name.strip() for name in spec.split("|")]
    unknown = [name for name in names if name not in TASKS and name not in EXTRA_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {'|'.join([*TASKS, *EXTRA_TASKS])} "
                         "(separate several with '|')")
    if len(set(names)) != len(names):
        raise ValueError(f"task list {spec!r} names a task twice")
    return names


def build_task(name):
    """The evaluation Task object for a name of TASKS or EXTRA_TASKS (loads its dataset)."""
    spec = TASKS.get(name) or EXTRA_TASKS.get(name)
    if spec is None:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join([*TASKS, *EXTRA_TASKS])}")
    module, cls, kwargs, _ = spec
    return getattr(importlib.import_module(module), cls)(**kwargs)


def _num_problems(task, max_problems):
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems must be None or >= 1, got {max_problems}")
    return len(task) if max_problems is None else min(len(task), max_problems)


def _reduce_counts(passed, total, device):
    if dist_world_size() > 1:
        counts = torch.tensor([passed, total], dtype=torch.long, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        passed, total = (int(v) for v in counts.tolist())
    return passed, total


def _accuracy(name, passed, total):
    if total == 0:
        raise ValueError(f"{name}: no problems were evaluated (empty task or max_problems too small)")
    logger.info("%s final: %d/%d (%.2f%%)", name, passed, total, 100 * passed / total)
    return passed / total


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None, name=None):
    """Accuracy of `model` on a multiple-choice task: the answer is the allowed letter with the highest logit
    at the <|assistant_start|> position, so the model never answers off the menu. Batch b goes to rank b mod W."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    name = name or type(task).__name__
    _, rank, _, world_size = get_dist_info()
    device = model_device(model)
    bos = tokenizer.get_bos_token_id()
    letter_ids = {}  # letter -> its single token id

    def letter_id(letter):
        if letter not in letter_ids:
            ids = tokenizer.encode(letter)
            if len(ids) != 1:
                raise ValueError(f"answer letter {letter!r} encodes to {len(ids)} tokens {ids}; categorical "
                                 "scoring needs every letter to be exactly one token")
            letter_ids[letter] = ids[0]
        return letter_ids[letter]

    num_problems = _num_problems(task, max_problems)
    num_batches = -(-num_problems // batch_size)
    passed = total = 0
    for b in range(rank, num_batches, world_size):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, num_problems))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)  # BOS padding after the answer position: a causal model never sees it
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)  # (B, T)
        logits = model(ids)  # (B, T, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            candidates = torch.tensor([letter_id(letter) for letter in letters], device=device)
            # The <|assistant_start|> position predicts the first answer token; argmax picks the first on ties.
            scores = logits[row, len(prompt) - 1, candidates]
            predicted = letters[int(torch.argmax(scores).item())]
            passed += int(bool(task.evaluate(conversation, predicted)))
            total += 1
    passed, total = _reduce_counts(passed, total, device)
    return _accuracy(name, passed, total)


def pass_at_k(outcomes, k):
    """Fraction of problems with a success among their first k samples; outcomes: per problem, a list of bools."""
    if not outcomes:
        raise ValueError("pass_at_k needs at least one problem")
    if k < 1 or any(len(o) < k for o in outcomes):
        raise ValueError(f"k={k} must be >= 1 and at most the number of samples of every problem")
    return sum(any(o[:k]) for o in outcomes) / len(outcomes)


REPLY_BUDGET_MARGIN = 1.5  # a model trained on a task's answers writes about as much as they do; room for more


def reply_budget(task, tokenizer, num_problems):
    """max_new_tokens for a generative task: REPLY_BUDGET_MARGIN x its longest reference answer (tool calls included)."""
    longest = 0
    for i in range(num_problems):
        conversation = task[i]
        whole, _ = tokenizer.render_conversation(conversation, max_tokens=1 << 30)
        longest = max(longest, len(whole) - len(tokenizer.render_for_completion(conversation)) + 1)
    return math.ceil(REPLY_BUDGET_MARGIN * longest)


def run_generative_eval(task, tokenizer, engine, num_samples=1, max_new_tokens=None, temperature=0.0, top_k=50,
                        max_problems=None, seed=42, name=None, details=None):
    """pass@num_samples of completions sampled with the engine (tool outputs included), judged by task.evaluate.
    max_new_tokens None = reply_budget(task). details: a dict, given {"max_new_tokens", "replies", "cut"}."""
    name = name or type(task).__name__
    _, rank, _, world_size = get_dist_info()
    num_problems = _num_problems(task, max_problems)
    if max_new_tokens is None:
        max_new_tokens = reply_budget(task, tokenizer, num_problems)
    live = sys.stderr.isatty()  # a live `Rank r | passed/total (xx.xx%)` line on a terminal only
    passed = total = cut = replies = 0
    for i in range(rank, num_problems, world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed)
        completions = [tokenizer.decode(result[len(prompt):]) for result in results]
        outcomes = [bool(task.evaluate(conversation, completion)) for completion in completions]
        passed += int(any(outcomes))
        total += 1
        cut += sum(len(result) - len(prompt) >= max_new_tokens for result in results)  # no end token in the budget
        replies += len(results)
        if live:
            sys.stderr.write(f"\r\033[KRank {rank} | {passed}/{total} ({100 * passed / total:.2f}%)")
            sys.stderr.flush()
    if live:
        sys.stderr.write("\n")
    device = model_device(engine.model)
    passed, total = _reduce_counts(passed, total, device)
    cut, replies = _reduce_counts(cut, replies, device)
    if cut:
        logger.warning("%s: %d of %d replies were cut at the %d-token limit before they ended", name, cut, replies,
                       max_new_tokens)
    if details is not None:
        details.update(max_new_tokens=max_new_tokens, replies=replies, cut=cut)
    return _accuracy(name, passed, total)


def run_task_eval(task, model, tokenizer, engine, batch_size=8, num_samples=1, max_new_tokens=None,
                  temperature=0.0, top_k=50, max_problems=None, name=None, details=None):
    """Accuracy of one Task with the runner its eval_type calls for (see run_generative_eval for the options)."""
    if task.eval_type == "categorical":
        return run_categorical_eval(task, tokenizer, model, batch_size, max_problems=max_problems, name=name)
    if task.eval_type == "generative":
        return run_generative_eval(task, tokenizer, engine, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, max_problems=max_problems, name=name,
                                   details=details)
    raise ValueError(f"{name or type(task).__name__} has eval_type {task.eval_type!r}; expected categorical or generative")


def evaluate_chatcore(model, tokenizer, engine, batch_size=8, max_categorical=None, max_generative=None, tasks=None,
                      num_samples=1, max_new_tokens=None, temperature=0.0, top_k=50):
    """{"accuracies": {name: acc}, "chatcore", "chatcore_cat"} over `tasks` ({name: Task}; default: all of TASKS).
    max_categorical / max_generative cap the problems per task (SFT's check: all and 24, as upstream's)."""
    tasks = {name: build_task(name) for name in TASKS} if tasks is None else tasks
    accuracies = {}
    for name, task in tasks.items():
        cap = max_categorical if task.eval_type == "categorical" else max_generative
        accuracies[name] = run_task_eval(task, model, tokenizer, engine, batch_size=batch_size, num_samples=num_samples,
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                         max_problems=cap, name=name)
    return {"accuracies": accuracies, "chatcore": chatcore(accuracies), "chatcore_cat": chatcore_cat(accuracies)}


def build_available_tasks(names=None):
    """{name: Task} for each task of `names` (default: TASKS) whose data can be had. Offline, a task that can't
    be fetched is left out and GSM8K becomes SyntheticArithmetic, each noted in tasks.common.fallbacks_used()."""
    from tasks.common import DatasetUnavailableError, note_fallback

    tasks = {}
    for name in names or TASKS:
        try:
            tasks[name] = build_task(name)
        except DatasetUnavailableError as err:
            if name == "GSM8K":
                note_fallback("eval:GSM8K", "GSM8K unavailable offline: evaluated on SyntheticArithmetic instead", detail=str(err))
                tasks["SyntheticArithmetic"] = build_task("SyntheticArithmetic")
            else:
                note_fallback(f"eval:{name}", f"{name} unavailable offline: not evaluated", detail=str(err))
    return tasks


def evaluate_available_chatcore(model, tokenizer, engine, **kwargs):
    """evaluate_chatcore over the tasks that build_available_tasks() finds (SFT's periodic check)."""
    return evaluate_chatcore(model, tokenizer, engine, tasks=build_available_tasks(), **kwargs)


def chatcore(accuracies, tasks=CHATCORE_TASKS, baselines=None):
    """Mean centered accuracy over `tasks`, or None when any of them is missing from `accuracies`."""
    baselines = BASELINES if baselines is None else baselines
    if any(name not in accuracies for name in tasks):
        return None
    return sum(centered_accuracy(accuracies[name], baselines[name]) for name in tasks) / len(tasks)


def chatcore_cat(accuracies):
    """ChatCORE over the three multiple-choice tasks only (cheap to compute often during SFT)."""
    return chatcore(accuracies, tasks=CATEGORICAL_TASKS)
