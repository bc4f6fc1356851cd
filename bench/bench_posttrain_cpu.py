"""
Post-training on CPU, with the learning made visible: base -> mid -> SFT -> RL at depth 4 on the offline data,
each stage run through its public script (`main([...])` in this process), and every stage's checkpoint
measured on the same held-out prompts.

    python -m bench.bench_posttrain_cpu                     # everything, in bench/results/posttrain/base (must be empty)
    python -m bench.bench_posttrain_cpu --reuse             # reuse the shards and tokenizer already there
    python -m bench.bench_posttrain_cpu --reuse --start-at rl   # retrain RL only (--remeasure: measure base..SFT too)
    python -m bench.bench_posttrain_cpu --dry-run           # depth 2, a few steps of each stage: checks the plumbing

Data and tokenizer are built as runcpu.sh builds them: `nanochat.dataset -n 4 --offline-fallback` (the offline
corpus when the dataset host can't be reached) and `scripts.tok_train --max-chars=20000000 --vocab-size=8192`.
HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set, so the hub tasks fall back at once: GSM8K -> the synthetic
arithmetic problems of tasks/arithmetic.py, identity -> the file shipped in nanochat/data, the spelling word
list -> words of the offline corpus; SmolTalk and MMLU are left out.

What is measured per stage (the same prompts, the same seeds, for base, mid, SFT and RL):
- held-out prompts: the first --eval-problems problems of the synthetic arithmetic TEST split (no test problem
  is in any train split, see tasks/arithmetic.py) and the CHAT_PROMPTS below (identity, spelling, plain chat);
- for each prompt one greedy reply and --eval-samples replies at temperature 1, top-k 50 (chat_rl's rollout and
  pass@k sampling), seeded per prompt, all of at most --max-new-tokens tokens, calculator tool on;
- "ends": the fraction of all those replies whose last token is <|assistant_end|> (a reply cut off by the
  token limit, or ended by <|bos|>, does not count), over arithmetic and chat prompts together and each apart;
- "tool": the fraction of arithmetic replies (greedy and sampled) with a <|python_start|> calculator call;
- "greedy": the accuracy (the task's reward: the final "#### N" is right) of the greedy replies;
- "pass@1": the mean reward of the sampled replies (pass@1 at temperature 1, estimated from --eval-samples
  draws per problem);
- the RL reward curve: chat_rl's per-step mean reward of its rollouts (returned by its main()).
Targets: after SFT at least 90% of replies end properly; RL lifts held-out pass@1 above the SFT model's.

Why these flags (depth 4, fp32 on a 2-core CPU; see docs/performance.md, "Post-training (CPU)"):
- T = 512 and 8 rows = 4,096 tokens per step everywhere, runcpu.sh's geometry: the conversations are short
  (a synthetic problem and its solution are ~100-150 tokens, a spelling one fewer).
- base: runcpu.sh's recipe with BASE_STEPS steps (300 instead of 200), so the model can copy numbers and names
  from its context, which is what the arithmetic solutions need (the calculator does the arithmetic).
- mid: the offline midtraining mixture is mostly spelling (SmolTalk and MMLU are missing), so MID_STEPS steps
  teach the chat format, tool-call syntax and stopping, but show only a few hundred arithmetic problems.
  Learning rates: mid_train's defaults times --finetune-lr-scale (1 by default).
- SFT: --gsm8k-epochs repeats the (synthetic) GSM8K stand-in (4 copies: about a tenth of the mixture) and
  SFT_STEPS is short (100): an SFT model that already solves nearly every problem (36 copies, 400 steps gave
  96% greedy) leaves RL nothing to learn, since every group of answers is all right and its advantages are 0.
  Batch geometry and learning rates are inherited from the mid checkpoint.
- RL: RL_EXAMPLES questions x RL_SAMPLES answers per step (one micro-batch per question), RL_STEPS steps,
  --max-new-tokens equal to the evaluation's, --init-lr-frac 0.02 (0.2 collapsed the reward to 0 within 15
  steps: Muon's orthogonalised steps have a fixed size however noisy the gradient; 0.05, upstream's, was
  stable but did not raise pass@1). Its own pass@k is off (this bench measures every stage the same way).
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time

import torch

from nanochat import dataset
from nanochat.checkpoint_manager import get_checkpoints_dir, load_model
from nanochat.common import autodetect_device_type, setup_default_logging
from nanochat.engine import Engine
from nanochat.rl import sample_answers
from scripts import base_train, chat_rl, chat_sft, mid_train, tok_train
from tasks.arithmetic import SyntheticArithmetic

log = logging.getLogger("bench.posttrain")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASE_DIR = os.path.join(REPO, "bench", "results", "posttrain", "base")
STAGES = ("base", "mid", "sft", "rl")
TITLES = {"base": "base", "mid": "mid", "sft": "SFT", "rl": "RL"}
END_TARGET = 0.90  # fraction of replies that end with <|assistant_end|> after SFT

# Plain chat prompts: who the model is, the spelling tasks' two kinds, and questions no stage trains on.
CHAT_PROMPTS = [
    "Hi! Who are you?",
    "What is your name?",
    "Who made you?",
    "Spell the word: garden",
    "How many r are in the word mirror",
    "What is the capital of France?",
    "Tell me a short story about a cat.",
    "Thanks for your help!",
]

# The stages' sizes (see the module docstring for why).
SEQ_LEN = 512
BATCH_ROWS = 8
BATCH_TOKENS = SEQ_LEN * BATCH_ROWS
MID_LRS = {"embedding_lr": 0.2, "unembedding_lr": 0.004, "matrix_lr": 0.02}  # mid_train's defaults
FULL = dict(base_steps=300, mid_steps=200, sft_steps=100, gsm8k_epochs=4, finetune_lr_scale=1.0, rl_steps=40, rl_examples=8,
            rl_samples=8, rl_lr_frac=0.02, eval_problems=200, eval_samples=4, max_new_tokens=128)
DRY = dict(base_steps=20, mid_steps=10, sft_steps=10, gsm8k_epochs=36, finetune_lr_scale=1.0, rl_steps=3, rl_examples=2,
           rl_samples=4, rl_lr_frac=0.02, eval_problems=4, eval_samples=2, max_new_tokens=48)
HELP = dict(base_steps="base_train steps", mid_steps="mid_train steps", sft_steps="chat_sft steps",
            gsm8k_epochs="chat_sft --gsm8k-epochs (copies of the synthetic GSM8K stand-in)",
            finetune_lr_scale="mid_train's default LRs times this (chat_sft inherits them)", rl_steps="chat_rl steps",
            rl_examples="chat_rl questions per step", rl_samples="chat_rl answers per question (one micro-batch)",
            rl_lr_frac="chat_rl --init-lr-frac", eval_problems="held-out arithmetic test problems",
            eval_samples="temperature-1 replies per held-out prompt (besides the greedy one)",
            max_new_tokens="reply limit of the evaluation and of chat_rl's rollouts")


def build_parser():
    p = argparse.ArgumentParser(description="base -> mid -> SFT -> RL at depth 4 on the offline data, each stage measured "
                                            "on the same held-out prompts (reply endings, tool calls, arithmetic accuracy).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--base-dir", default=DEFAULT_BASE_DIR, help="NANOCHAT_BASE_DIR of the run: data, tokenizer, checkpoints")
    g.add_argument("--reuse", action="store_true", help="reuse the shards and tokenizer found in --base-dir (else it must be empty)")
    g.add_argument("--start-at", choices=STAGES, default="base", help="train from this stage on; earlier stages' checkpoints are reused")
    g.add_argument("--stop-after", choices=STAGES, default="rl", help="train and measure up to this stage only")
    g.add_argument("--remeasure", action="store_true", help="also measure the reused stages before --start-at")
    g.add_argument("--dry-run", action="store_true", help="depth 2 and a few steps per stage (unless given): checks the plumbing")
    g.add_argument("--depth", type=int, default=None, help="model depth (default 4, dry run 2)")
    g.add_argument("--cores", type=int, default=-1, help="pin the process to this many of its cores, so the scripts use that many "
                                                         "torch threads (-1 = all; 1 suffers less on a busy machine)")
    g.add_argument("--json", default=None, help="summary path (default: bench/results/posttrain/summary_d<depth>.json)")
    g = p.add_argument_group("stages and evaluation (default: the full run's value, or the dry run's)")
    for name, value in FULL.items():
        g.add_argument("--" + name.replace("_", "-"), type=type(value), default=argparse.SUPPRESS,
                       help=f"{HELP[name]}; full run {value}, dry run {DRY[name]}")
    return p


def resolve(args):
    """Fill the stage lengths left unset from the full or the dry-run preset."""
    preset = DRY if args.dry_run else FULL
    for name, value in preset.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    if args.depth is None:
        args.depth = 2 if args.dry_run else 4
    args.tag = f"d{args.depth}"
    if args.json is None:
        args.json = os.path.join(REPO, "bench", "results", "posttrain", f"summary_{args.tag}{'_dry' if args.dry_run else ''}.json")
    return args


# -----------------------------------------------------------------------------
# The stages, through the scripts


def prepare_data(args):
    """Shards and tokenizer as runcpu.sh makes them, unless --reuse finds them."""
    have_shards = os.path.isdir(dataset.get_data_dir()) and any(f.endswith(".parquet") for f in os.listdir(dataset.get_data_dir()))
    have_tokenizer = os.path.exists(os.path.join(args.base_dir, "tokenizer", "tokenizer.pkl"))
    if not have_shards:
        dataset.main(["-n", "4", "--offline-fallback"])
    if not have_tokenizer:
        tok_train.main(["--max-chars=20000000", "--vocab-size=8192"])


def stage_argv(stage, args):
    """The command line each script gets."""
    mid_lr = [f"--{name.replace('_', '-')}={lr * args.finetune_lr_scale:g}" for name, lr in MID_LRS.items()]
    if stage == "base":
        return [f"--depth={args.depth}", f"--max-seq-len={SEQ_LEN}", "--window-pattern=L", f"--device-batch-size={BATCH_ROWS}",
                f"--total-batch-size={BATCH_TOKENS}", f"--num-iterations={args.base_steps}", f"--eval-every={args.base_steps}",
                "--eval-tokens=32768", "--core-metric-every=-1", "--sample-every=-1", "--warmup-steps=10"]
    if stage == "mid":
        return [f"--model-tag={args.tag}", f"--max-seq-len={SEQ_LEN}", f"--device-batch-size={BATCH_ROWS}",
                f"--total-batch-size={BATCH_TOKENS}", f"--num-iterations={args.mid_steps}", "--eval-every=-1",
                "--eval-tokens=32768", *mid_lr]
    if stage == "sft":  # batch geometry and learning rates inherited from the mid checkpoint
        return [f"--model-tag={args.tag}", f"--num-iterations={args.sft_steps}", f"--gsm8k-epochs={args.gsm8k_epochs}",
                "--eval-every=-1", "--eval-tokens=32768", "--chatcore-every=-1"]
    return [f"--model-tag={args.tag}", f"--num-iterations={args.rl_steps}", f"--examples-per-step={args.rl_examples}",
            f"--num-samples={args.rl_samples}", f"--device-batch-size={args.rl_samples}", f"--max-new-tokens={args.max_new_tokens}",
            f"--init-lr-frac={args.rl_lr_frac}", "--eval-every=-1", "--save-every=-1"]


def train_stage(stage, args):
    """Run one stage's script; returns (its val bpb or None, the RL reward curve or None)."""
    shutil.rmtree(os.path.join(get_checkpoints_dir(stage), args.tag), ignore_errors=True)  # no stale step to resume or load
    main = {"base": base_train.main, "mid": mid_train.main, "sft": chat_sft.main, "rl": chat_rl.main}[stage]
    argv = ["--device-type=cpu", *stage_argv(stage, args)]
    log.info("%s: %s", stage, " ".join(argv))
    out = main(argv)
    if stage == "rl":
        result, history = out
        return None, [reward for reward, _ in history]
    return out.metrics.get("val_bpb"), None


# -----------------------------------------------------------------------------
# Measuring a checkpoint


def held_out_prompts(args):
    """(kind, conversation) pairs: arithmetic test problems, then the chat prompts (with an empty reply to complete)."""
    test = SyntheticArithmetic(size=args.eval_problems, split="test")
    problems = [("arith", test[i]) for i in range(len(test))]
    chats = [("chat", {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]})
             for text in CHAT_PROMPTS]
    return test, problems + chats


@torch.no_grad()
def measure(stage, args, device):
    """Replies of `stage`'s checkpoint to the held-out prompts, and the rates the bench reports."""
    model, tokenizer, _ = load_model(stage, device, phase="eval", model_tag=args.tag)
    engine = Engine(model, tokenizer)
    end, tool = tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|python_start|>")
    task, prompts = held_out_prompts(args)
    counts = {"arith": [0, 0], "chat": [0, 0]}  # kind -> [replies, ended properly]
    tool_calls = greedy_correct = sampled_reward = sampled = lengths = 0
    examples = []
    t0, c0 = time.perf_counter(), time.process_time()
    for index, (kind, conversation) in enumerate(prompts):
        prompt = tokenizer.render_for_completion(conversation)
        greedy = sample_answers(engine, tokenizer, prompt, 1, args.max_new_tokens, 0.0, None, seed=0)
        drawn = sample_answers(engine, tokenizer, prompt, args.eval_samples, args.max_new_tokens, 1.0, 50, seed=1000 + index)
        for ids, _, _ in greedy + drawn:
            counts[kind][0] += 1
            counts[kind][1] += bool(ids) and ids[-1] == end
            lengths += len(ids)
            if kind == "arith":
                tool_calls += tool in ids
        if kind == "arith":
            greedy_correct += task.reward(conversation, tokenizer.decode(greedy[0][0]))
            sampled_reward += sum(task.reward(conversation, tokenizer.decode(ids)) for ids, _, _ in drawn)
            sampled += len(drawn)
        if kind == "chat" or index < 3:
            examples.append({"prompt": conversation["messages"][0]["content"], "greedy": tokenizer.decode(greedy[0][0])})
    replies = counts["arith"][0] + counts["chat"][0]
    return {
        "ends": (counts["arith"][1] + counts["chat"][1]) / replies,
        "ends_arith": counts["arith"][1] / max(1, counts["arith"][0]),
        "ends_chat": counts["chat"][1] / max(1, counts["chat"][0]),
        "tool_calls": tool_calls / max(1, counts["arith"][0]),
        "greedy_acc": greedy_correct / max(1, len(task)),
        "pass@1": sampled_reward / max(1, sampled),
        "mean_reply_tokens": lengths / replies,
        "replies": replies,
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "eval_cpu_seconds": round(time.process_time() - c0, 1),
        "examples": examples,
    }


# -----------------------------------------------------------------------------
# Report


def table(results):
    rows = ["| stage | ends (all) | ends (arith) | ends (chat) | tool calls | greedy acc | pass@1 (T=1) | reply tokens | train s (CPU s) | eval s (CPU s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        r = results.get(stage)
        if r is None:
            continue
        train = f"{r['train_seconds']:.0f} ({r['train_cpu_seconds']:.0f})" if r.get("train_seconds") is not None else "reused"
        rows.append(f"| {TITLES[stage]} | {r['ends']:.1%} | {r['ends_arith']:.1%} | {r['ends_chat']:.1%} | {r['tool_calls']:.1%} | "
                    f"{r['greedy_acc']:.1%} | {r['pass@1']:.1%} | {r['mean_reply_tokens']:.1f} | {train} | "
                    f"{r['eval_seconds']:.0f} ({r['eval_cpu_seconds']:.0f}) |")
    return "\n".join(rows)


def targets(results):
    """[(name, passed, detail)] for the two targets."""
    out = []
    if "sft" in results:
        ends = results["sft"]["ends"]
        out.append((f"after SFT >= {END_TARGET:.0%} of replies end with <|assistant_end|>", ends >= END_TARGET, f"{ends:.1%}"))
    if "sft" in results and "rl" in results:
        sft, rl = results["sft"]["pass@1"], results["rl"]["pass@1"]
        out.append(("RL raises held-out pass@1 above SFT's", rl > sft, f"SFT {sft:.1%} -> RL {rl:.1%}"))
    return out


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    setup_default_logging()
    args.base_dir = os.path.abspath(args.base_dir)
    if not args.reuse and os.path.isdir(args.base_dir) and os.listdir(args.base_dir):
        raise SystemExit(f"bench_posttrain_cpu: error: {args.base_dir} is not empty; pass --reuse to reuse its data and "
                         "tokenizer, or remove it")
    if args.start_at != "base" and not args.reuse:
        raise SystemExit("bench_posttrain_cpu: error: --start-at needs --reuse (the earlier stages' checkpoints are read)")
    os.makedirs(args.base_dir, exist_ok=True)
    # Everything the scripts read and write goes under the bench's own base dir; the hub is never tried.
    os.environ["NANOCHAT_BASE_DIR"] = args.base_dir
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.cores > 0 and hasattr(os, "sched_setaffinity"):
        # start_run gives each script one torch thread per core of the affinity mask.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[-args.cores:])
        torch.set_num_threads(args.cores)
    device = torch.device(autodetect_device_type())
    log.info("Post-training bench: depth %d, base dir %s, stage lengths %s", args.depth, args.base_dir,
             {k: getattr(args, k) for k in FULL})

    t_start = time.perf_counter()
    t0 = time.perf_counter()
    prepare_data(args)
    data_seconds = time.perf_counter() - t0
    results, val_bpb, train_cpu, curve = {}, {}, {}, None
    for stage in STAGES[:STAGES.index(args.stop_after) + 1]:
        train_seconds = None
        if STAGES.index(stage) < STAGES.index(args.start_at) and not args.remeasure:
            continue
        if STAGES.index(stage) >= STAGES.index(args.start_at):
            t0, c0 = time.perf_counter(), time.process_time()
            val_bpb[stage], stage_curve = train_stage(stage, args)
            train_seconds, train_cpu[stage] = time.perf_counter() - t0, time.process_time() - c0
            curve = stage_curve if stage == "rl" else curve
        # Decoding a d4 model is a chain of tiny ops: one thread is as fast on a quiet machine, and on a busy one
        # two spin-waiting threads made a 64-token sample 5-50x slower (measured: 0.3 s vs 1.8-14 s).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        results[stage] = measure(stage, args, device)
        torch.set_num_threads(threads)
        results[stage]["train_seconds"] = train_seconds
        results[stage]["train_cpu_seconds"] = train_cpu.get(stage)
        results[stage]["val_bpb"] = val_bpb.get(stage)
        r = results[stage]
        log.info("%s: ends %.1f%% | tool calls %.1f%% | greedy %.1f%% | pass@1 %.1f%% | %.1f tokens per reply | eval %.0f s",
                 TITLES[stage], 100 * r["ends"], 100 * r["tool_calls"], 100 * r["greedy_acc"], 100 * r["pass@1"],
                 r["mean_reply_tokens"], r["eval_seconds"])
    wall = time.perf_counter() - t_start

    print("\nHeld-out replies: %d arithmetic test problems + %d chat prompts, each 1 greedy + %d sampled (T=1, top-k 50), "
          "at most %d new tokens" % (args.eval_problems, len(CHAT_PROMPTS), args.eval_samples, args.max_new_tokens))
    print(table(results))
    if curve is not None:
        print("\nRL mean reward per step: " + " ".join(f"{r:.3f}" for r in curve))
        k = max(1, min(5, len(curve) // 2))
        print(f"RL mean reward, first {k} steps {sum(curve[:k]) / k:.3f} -> last {k} steps {sum(curve[-k:]) / k:.3f}")
    for stage in results:
        print(f"\n{TITLES[stage]} greedy replies:")
        for ex in results[stage]["examples"][:5]:
            print(f"  {ex['prompt'][:60]!r} -> {ex['greedy'][:160]!r}")
    checks = targets(results)
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {name} ({detail})")
    print(f"wall time {wall / 60:.1f} min (data + tokenizer {data_seconds:.0f} s)")

    summary = {"config": {k: v for k, v in vars(args).items()}, "chat_prompts": CHAT_PROMPTS, "stages": results,
               "rl_reward_curve": curve, "targets": [{"target": n, "passed": ok, "value": d} for n, ok, d in checks],
               "wall_seconds": round(wall, 1), "data_seconds": round(data_seconds, 1),
               "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"summary: {args.json}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
