"""
Evaluate a checkpoint with EleutherAI's lm-evaluation-harness, through our `nanochat` lm-eval model.

    python -m scripts.lm_eval -i sft --tasks arc_easy,hellaswag --limit 100
    python -m scripts.lm_eval -i sft --tasks gsm8k --apply-chat-template --num-fewshot 5
    python -m scripts.lm_eval -i base -g d20 -s 5000 --tasks my_task --include-path my_tasks/   # local YAML tasks

Needs the `eval` extra: `uv sync --extra eval`. lm-eval downloads each task's dataset from the Hugging Face hub
on first use (a local task over a JSON file needs no network). Prints lm-eval's table, writes the report line
"lm-eval harness". The model adapter is nanochat/lm_eval_adapter.py; once it is imported, lm-eval's Python API
also reaches it by name: simple_evaluate(model="nanochat", model_args="source=sft,model_tag=d20", ...).
"""

import argparse
import logging

from nanochat.checkpoint_manager import add_checkpoint_flags
from nanochat.common import (ConfigError, add_debug_flag, autodetect_device_type, compute_cleanup, compute_init, script_main,
                             setup_default_logging)

log = logging.getLogger("nanochat.lm_eval")


def parse_limit(text):
    """--limit: an int (examples per task) or a float below 1 (that fraction of each task)."""
    value = float(text)
    if value <= 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count >= 1 or a fraction in (0, 1)")
    return int(value) if value >= 1 else value


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a nanochat checkpoint with lm-evaluation-harness.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_flags(p, default="base", source_help="checkpoint family to evaluate")
    p.add_argument("--tasks", required=True, help="comma list of lm-eval task (or group) names")
    p.add_argument("--limit", type=parse_limit, default=None, help="examples per task (or a fraction < 1); default all")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's own)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass for log-likelihood requests")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts as chat conversations (chat models)")
    p.add_argument("--include-path", default=None, help="a folder of extra task YAMLs (e.g. a local task over a JSON file)")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds (few-shot draws, sampling)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    add_debug_flag(p)
    return p


@script_main("lm_eval")
def main(argv=None):
    """Run the evaluation; returns lm-eval's results dict."""
    setup_default_logging()
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]

    from nanochat.lm_eval_adapter import NanochatLM, require_lm_eval

    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from nanochat.checkpoint_manager import load_model, resolve_checkpoint
    from nanochat.report import get_report

    task_manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown or not tasks:
        raise ConfigError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown) or '(none given)'}; see `lm-eval ls tasks`, "
                          "or point --include-path at a folder with their YAML")
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    try:
        _, tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=tag, step=step)
        lm = NanochatLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                          apply_chat_template=args.apply_chat_template, task_manager=task_manager,
                                          log_samples=False, random_seed=args.seed, numpy_random_seed=args.seed,
                                          torch_random_seed=args.seed, fewshot_random_seed=args.seed)
        print(make_table(results))
        scores = {f"{task} {metric.split(',')[0]}": value for task, metrics in results["results"].items()
                  for metric, value in metrics.items() if isinstance(value, float) and "_stderr" not in metric}
        get_report().log(section="lm-eval harness",
                         data=[{"Checkpoint": f"{args.source} {tag} step {step}", "Tasks": ", ".join(tasks),
                                "Limit": args.limit if args.limit is not None else "all",
                                "Chat template": args.apply_chat_template}, scores])
        return results
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
