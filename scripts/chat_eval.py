"""
Evaluate a chat model (mid / SFT / RL checkpoint) on ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval
and SpellingBee, and compute ChatCORE when all six ran.

One GPU / CPU:   python -m scripts.chat_eval -i sft
Many GPUs:       torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft
Some tasks:      python -m scripts.chat_eval -i rl -a GSM8K
                 python -m scripts.chat_eval -i sft -a 'ARC-Easy|MMLU' -x 200
pass@8:          python -m scripts.chat_eval -i sft -a GSM8K -n 8 -t 1.0

Writes the report section "Chat evaluation <source>": the arguments (with the device used), each task's
accuracy, each generative task's reply budget and how many replies it cut, and, when every task ran,
"ChatCORE metric". The evaluation itself lives in nanochat/chateval.py.
"""

import argparse
import logging
import time

from nanochat.checkpoint_manager import add_checkpoint_flags
from nanochat.common import (ConfigError, add_debug_flag, autodetect_device_type, compute_cleanup, compute_init, script_main,
                             setup_default_logging)

log = logging.getLogger("nanochat.chat_eval")

SOURCES = ("mid", "sft", "rl")


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a chat model on the ChatCORE tasks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_flags(p, default=None, sources=SOURCES, source_help="checkpoint family to evaluate")
    p.add_argument("-a", "--task-name", default=None,
                   help="one task or several separated by '|' (default: all; ChatCORE needs all)")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("-m", "--max-new-tokens", type=int, default=None,
                   help="generation limit per sample; none = per task, 1.5x its longest reference answer")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling (0 = off; ignored at temperature 0)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="prompts per forward pass for multiple-choice tasks")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate at most this many problems per task")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    add_debug_flag(p)
    return p


def check_args(args):
    """Reject flag values that would fail later (or silently mean something else); returns the task list."""
    from nanochat.chateval import parse_task_names

    problems = []
    if args.temperature < 0:
        problems.append(f"--temperature must be >= 0, got {args.temperature}")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--num-samples", args.num_samples),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if args.top_k < 0:
        problems.append(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.max_problems is not None and args.max_problems < 1:
        problems.append(f"--max-problems must be >= 1 (or left out for all), got {args.max_problems}")
    try:
        names = parse_task_names(args.task_name)
    except ValueError as e:
        problems.append(f"--task-name: {e}")
        names = []
    if problems:
        raise ConfigError("; ".join(problems))
    return names


@script_main("chat_eval")
def main(argv=None):
    """Run the evaluation; returns {"accuracies": {task: acc}, "chatcore": float | None}."""
    setup_default_logging()
    args = build_parser().parse_args(argv)
    task_names = check_args(args)

    from nanochat.chateval import CHATCORE_TASKS, build_available_tasks, build_task, chatcore, run_task_eval
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from nanochat.report import get_report
    from tasks.common import fallbacks_used

    device_type = args.device_type or autodetect_device_type()
    _, rank, _, _, device = compute_init(device_type)
    try:
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        engine = Engine(model, tokenizer)

        # The default run (every task) evaluates what can be had offline, with GSM8K's synthetic stand-in;
        # a task asked for by name must be there.
        tasks = build_available_tasks(task_names) if not args.task_name else {name: build_task(name) for name in task_names}
        accuracies, budgets = {}, {}
        for name, task in tasks.items():
            t0, details = time.time(), {}
            accuracies[name] = run_task_eval(task, model, tokenizer, engine, batch_size=args.batch_size,
                                             num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                             temperature=args.temperature, top_k=args.top_k,
                                             max_problems=args.max_problems, name=name, details=details)
            log.info("%s accuracy: %.2f%% (%.1fs)", name, 100 * accuracies[name], time.time() - t0)
            if details:
                budgets[f"{name} replies cut at the limit"] = (f"{details['cut']}/{details['replies']} "
                                                               f"(limit {details['max_new_tokens']} tokens)")

        # Only a full run is comparable across models: a partial one would average a different task set.
        score = chatcore(accuracies) if set(task_names) == set(CHATCORE_TASKS) else None
        if score is not None:
            log.info("ChatCORE metric: %.4f", score)
        elif set(task_names) == set(CHATCORE_TASKS):
            log.info("ChatCORE metric: n/a (not every task could be evaluated: %s missing)",
                     ", ".join(sorted(set(CHATCORE_TASKS) - set(accuracies))))
        stand_ins = {"Offline stand-ins": "; ".join(fallbacks_used())} if fallbacks_used() else None
        settings = {**vars(args), "device_type": device_type}  # the device used, not the flag (empty = autodetect)
        get_report().log(section=f"Chat evaluation {args.source}",
                         data=[settings, accuracies, {"ChatCORE metric": score} if score is not None else None,
                               budgets or None, stand_ins])
        return {"accuracies": accuracies, "chatcore": score}
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
