"""
RL on math word problems: REINFORCE with a per-question mean baseline, rollouts sampled by the Engine with
the calculator tool (nanochat/rl.py), on the shared training loop.

One GPU / CPU:   python -m scripts.chat_rl
Many GPUs:       torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=rl
Tiny CPU run:    python -m scripts.chat_rl --num-iterations=20 --examples-per-step=4 --num-samples=8 --max-new-tokens=64

Reads chatsft_checkpoints/<tag>, writes chatrl_checkpoints/<tag> and the report section "Chat RL". GSM8K
when it can be had, else the synthetic arithmetic problems of tasks/arithmetic.py (said in the log and
the report). pass@k on held-out problems every --eval-every steps.
"""

import argparse
import logging
import os
from dataclasses import asdict

from nanochat import training
from nanochat.checkpoint_manager import add_checkpoint_flags, get_checkpoints_dir, load_optimizer_state
from nanochat.common import add_runtime_flags, script_main, setup_default_logging
from nanochat.engine import Engine
from nanochat.finetune import load_start, make_optimizer
from nanochat.loop import Checkpointer, Periodic, TrainLoop, TrainStep, start_run
from nanochat.report import get_report
from nanochat.rl import RolloutStream, evaluate_pass_at_k, mean_over_ranks, policy_gradient_loss
from tasks.common import fallbacks_used, gsm8k_or_synthetic

log = logging.getLogger("nanochat.chat_rl")


def build_parser():
    p = argparse.ArgumentParser(description="RL on math word problems (REINFORCE, group-mean baseline) from the SFT model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_runtime_flags(p.add_argument_group("logging and runtime"),
                      seed_help="seed of torch's generators (sampling seeds derive from step and problem)")
    g = p.add_argument_group("checkpoints")
    add_checkpoint_flags(g, default="sft", sources=("sft", "mid"), source_help="checkpoint to start from", training=True)
    g.add_argument("--resume-from-step", type=int, default=-1, help="resume from this step of chatrl_checkpoints (-1 = start from --source)")
    g.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps and at the end (-1 = only at the end)")
    g = p.add_argument_group("rollouts and optimization")
    g.add_argument("--num-epochs", type=int, default=1, help="epochs over the training problems")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
    g.add_argument("--device-batch-size", type=int, default=8, help="answers per forward pass (sampling and training)")
    g.add_argument("--examples-per-step", type=int, default=16, help="questions per optimizer step, over all ranks")
    g.add_argument("--num-samples", type=int, default=16, help="answers sampled per question")
    g.add_argument("--max-new-tokens", type=int, default=256, help="generation limit per answer")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=50, help="top-k sampling (0 = off)")
    training.add_lr_flags(g, "rl")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay")
    g.add_argument("--init-lr-frac", type=float, default=0.05, help="every LR is this fraction of the above")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=60, help="pass@k every N steps, from step 0 (-1 = never)")
    g.add_argument("--eval-examples", type=int, default=400, help="held-out problems per pass@k evaluation")
    return p


@script_main("chat_rl")
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    user_config = vars(args).copy()
    run = start_run(args.device_type, args.seed, "nanochat-rl", args.run, user_config)
    start = load_start("rl", args.source, args.model_tag, args.model_step, args.resume_from_step, run.device)
    model, tokenizer = start.model, start.tokenizer
    optimizer = make_optimizer(model, vars(args), args.weight_decay, args.init_lr_frac)
    if start.resume is not None:
        optimizer.load_state_dict(load_optimizer_state("rl", run.device, run.rank, model_tag=start.tag, step=start.source_step, required=True))

    train_task, test_task = gsm8k_or_synthetic("train"), gsm8k_or_synthetic("test")
    engine = Engine(model, tokenizer)  # samples from the weights being trained: strictly on-policy
    stream = RolloutStream(train_task, tokenizer, engine, args.examples_per_step, args.num_samples, args.device_batch_size,
                           args.max_new_tokens, args.temperature, args.top_k,
                           resume_state_dict=(start.resume or {}).get("dataloader_state_dict"))
    num_steps = args.num_iterations if args.num_iterations > 0 else (len(train_task) // args.examples_per_step) * args.num_epochs
    log.info("RL on %s: %d steps of %d questions x %d answers (%d micro-batches per rank per step)", type(train_task).__name__,
             num_steps, args.examples_per_step, args.num_samples, stream.micro_batches_per_step)
    step = TrainStep(model, optimizer, stream.micro_batches_per_step, loss_fn=policy_gradient_loss,
                     oom_hint="lower --device-batch-size or --max-new-tokens")

    def pass_at_k(step_):
        model.eval()
        scores = evaluate_pass_at_k(test_task, tokenizer, engine, args.eval_examples, args.device_batch_size,
                                    args.max_new_tokens, args.temperature, args.top_k)
        model.train()
        log.info("Step %05d | %s", step_, " | ".join(f"pass@{k}: {v:.4f}" for k, v in scores.items()))
        return {f"pass@{k}": v for k, v in scores.items()}

    def rewards(state):
        # Every rank calls this each step: the means are averaged over ranks.
        reward, length = mean_over_ranks([state["reward"], state["sequence_length"]], run.device)
        return {"reward": reward, "sequence_length": length}

    checkpointer = Checkpointer(os.path.join(get_checkpoints_dir("rl"), start.tag), args.save_every, model, optimizer, meta=dict(
        model_config=asdict(model.config), user_config=user_config, world_size=run.world_size, source=args.source))
    model.train()
    # Rollouts come from the current weights, so nothing may be fetched before the previous update: no prefetch.
    result = TrainLoop(step=step, batches=stream, horizon=num_steps, prefetch=False, periodic=[
                           Periodic("pass@k", args.eval_every, pass_at_k, at_start=True, at_last=False)] if args.eval_every > 0 else [],
                       schedule=lambda it, progress: {"lrm": training.linear_decay(it, num_steps)},
                       checkpointer=checkpointer, meter=run.meter(0, model.estimate_flops()),
                       wandb_run=run.wandb_run, sync=run.sync, wandb_every=1, describe=rewards, curve="rl").run(resume=start.resume)

    curve = [round(r, 4) for r, _ in stream.history]
    get_report().log(section="Chat RL", data=[
        user_config,
        {"Source checkpoint": f"{start.source} {start.source_tag}", "Training problems": f"{type(train_task).__name__} ({len(train_task):,})",
         "Number of iterations": result.step, "DDP world size": run.world_size,
         "Offline stand-ins": "; ".join(fallbacks_used()) or "none"},
        {"Mean reward, first steps": curve[:5], "Mean reward, last steps": curve[-5:],
         **{k: v for k, v in result.metrics.items() if k.startswith("pass@")}, **result.report_rows()},
    ])
    run.finish()
    return result, stream.history


if __name__ == "__main__":
    main()
