"""
Pretrain the base GPT from scratch.

One GPU / CPU:   python -m scripts.base_train --depth=12
Many GPUs:       torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24 --fp8
Tiny CPU run:    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=8 --num-iterations=50

`--depth` is the one dial: width, heads, batch size, horizon, learning rates and weight decay follow
from it (the scaling rules in nanochat/training.py).
"""

import argparse
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import asdict

import torch

from nanochat import fp8, training
from nanochat.checkpoint_manager import load_checkpoint
from nanochat.common import add_runtime_flags, get_base_dir, script_main, setup_default_logging
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import (tokenizing_distributed_data_loader_bos_bestfit,
                                 tokenizing_distributed_data_loader_with_state_bos_bestfit)
from nanochat.engine import complete_prompts
from nanochat.flash_attention import log_attention_plan
from nanochat.gpt import GPT
from nanochat.loop import Checkpointer, Periodic, TrainLoop, start_run, token_batch_step
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer

log = logging.getLogger("nanochat.base_train")


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain the base model. Derived values (width, batch, LR, WD, horizon) are printed at startup.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("logging and runtime")
    add_runtime_flags(g, seed_help="seed of the weight init (pretraining reads the shards in a fixed order)")
    g.add_argument("--fp8", action="store_true", help="FP8 training of the big matmuls (CUDA SM>=8.9 only)")
    g.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["tensorwise"], help="FP8 scaling recipe")
    g.add_argument("--compile", type=str, default="auto", choices=["auto", "on", "off"], help="torch.compile the model (auto = on for CUDA, off elsewhere)")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers")
    g.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio, rounded up to a multiple of head_dim")
    g.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    g.add_argument("--window-pattern", type=training.window_pattern_arg, default="SSSL",
                   help="per-layer attention windows tiled over layers: L=full context, S=quarter context; the last layer is always L")
    g = p.add_argument_group("horizon (first positive one wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps (-1 = derive)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="derive steps from a FLOPs budget (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens = ratio * scaling params (-1 = off)")
    g = p.add_argument_group("optimization")
    training.add_device_batch_size_flag(g, "auto")
    g.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = auto from depth)")
    training.add_lr_flags(g, "base")
    g.add_argument("--weight-decay", type=float, default=0.28, help="reference Muon weight decay (scaled with batch and horizon)")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="LR of the x0 lambdas (resid lambdas get 0.01x)")
    g.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
    g.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps in the final linear LR warmdown")
    g.add_argument("--final-lr-frac", type=float, default=0.05, help="LR multiplier at the end of warmdown")
    g.add_argument("--resume-from-step", type=int, default=-1, help="resume from this checkpoint step (-1 = start fresh)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps, at step 0 and at the end (-1 = disable)")
    g.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens per val bpb evaluation")
    g.add_argument("--core-metric-every", type=int, default=2000, help="CORE metric every N steps and at the end (-1 = disable)")
    g.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1 = all)")
    g.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps and at the end (-1 = disable)")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    return p


@script_main("base_train")
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    user_config = vars(args).copy()
    run = start_run(args.device_type, args.seed, "nanochat", args.run, user_config)
    device = run.device
    log_attention_plan(device, run.compute_dtype, args.window_pattern)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()
    log.info("Vocab size: %s", f"{vocab_size:,}")

    # Model: shapes on the meta device, then real storage and init (or the checkpoint's weights).
    def meta_model(depth):
        config = training.config_for_depth(depth, args.aspect_ratio, args.head_dim, args.max_seq_len, args.window_pattern, vocab_size)
        with torch.device("meta"):
            return GPT(config)

    model = meta_model(args.depth)
    log.info("Model config: %s", json.dumps(asdict(model.config)))
    model.to_empty(device=device)
    model.init_weights()
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")
    meta = None
    if args.resume_from_step >= 0:
        log.info("Resuming from step %d of %s", args.resume_from_step, checkpoint_dir)
        model_data, optim_data, meta = load_checkpoint(checkpoint_dir, args.resume_from_step, device, load_optimizer=True, rank=run.rank)
        model.load_state_dict(model_data, strict=True, assign=True)  # before FP8 conversion and compile
        del model_data

    if args.fp8 and device.type != "cuda":
        log.warning("--fp8 needs CUDA; ignoring it on %s", device.type)
    elif args.fp8:
        converted, skipped = fp8.convert_to_float8_training(model, recipe=args.fp8_recipe)
        log.info("FP8: converted %d linear layers, kept %d in %s", converted, skipped, run.compute_dtype)
    orig_model = model  # for evals with varying shapes, sampling and saving; `model` may be compiled
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        model = torch.compile(model, dynamic=False)

    param_counts = orig_model.num_scaling_params()
    for key, value in param_counts.items():
        log.info("%-24s: %s", key, f"{value:,}")
    num_flops_per_token = orig_model.estimate_flops()
    log.info("Estimated FLOPs per token: %e", num_flops_per_token)

    # Scaling rules: batch size, LR, WD and horizon, relative to a d12 reference built with the same flags.
    def scaling_params(m):
        counts = m.num_scaling_params()
        return counts["transformer_matrices"] + counts["lm_head"]

    plan = training.scaling_plan(scaling_params(orig_model), scaling_params(meta_model(12)), num_flops_per_token,
                                 total_batch_size=args.total_batch_size, num_iterations=args.num_iterations,
                                 target_flops=args.target_flops, target_param_data_ratio=args.target_param_data_ratio,
                                 weight_decay=args.weight_decay)
    num_iterations, total_batch_size = plan.num_iterations, plan.total_batch_size
    s = plan.batch_lr_scale
    optimizer = orig_model.setup_optimizer(unembedding_lr=args.unembedding_lr * s, embedding_lr=args.embedding_lr * s,
                                           scalar_lr=args.scalar_lr * s, matrix_lr=args.matrix_lr * s,
                                           weight_decay=plan.weight_decay)
    T = args.max_seq_len
    step, B = token_batch_step(run, model, optimizer, args.device_batch_size, total_batch_size, T, vocab_size)
    log.info("Batch LR scale: %.6f | scaled weight decay: %.6f | iterations: %s | tokens: %s | tokens:scaling-params %.2f | total FLOPs %e",
             plan.batch_lr_scale, plan.weight_decay, f"{num_iterations:,}", f"{total_batch_size * num_iterations:,}",
             total_batch_size * num_iterations / scaling_params(orig_model), num_flops_per_token * total_batch_size * num_iterations)
    if meta is not None:
        optimizer.load_state_dict(optim_data)  # restores each group's saved hyperparameters, initial_lr included
        del optim_data

    loader_state = (meta or {}).get("dataloader_state_dict")
    if meta is not None and loader_state is None:
        log.warning("The checkpoint has no data loader state: reading the training data from its start")
    train_loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, B, T, split="train", device=device,
                                                                             resume_state_dict=loader_state)
    # FP8 layers are for the training matmuls: evaluation and sampling run in the compute dtype.
    plain = (lambda: fp8.disable_fp8(orig_model)) if args.fp8 and device.type == "cuda" else nullcontext

    def val_bpb(step_):
        model.eval()
        with plain():
            # A fresh val loader each time: every evaluation reads the same tokens.
            loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, split="val", device=device)
            bpb = evaluate_bpb(model, loader, training.eval_steps_for(args.eval_tokens, B, T, run.world_size), token_bytes)
        model.train()
        log.info("Step %05d | Validation bpb: %.6f", step_, bpb)
        return {"val_bpb": bpb}

    def core_metric(step_):
        # The uncompiled model: CORE batches vary in shape, and a compiled one would recompile for each.
        orig_model.eval()
        with plain():
            results = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
        orig_model.train()
        log.info("Step %05d | CORE metric: %.4f", step_, results["core_metric"])
        return {"core_metric": results["core_metric"], "centered_results": results["centered_results"]}

    def samples(step_):
        orig_model.eval()
        with plain():
            for text in complete_prompts(orig_model, tokenizer):
                log.info("sample: %s", text)
        orig_model.train()

    checkpointer = Checkpointer(checkpoint_dir, args.save_every, orig_model, optimizer, meta=dict(
        model_config=asdict(orig_model.config), user_config=user_config, device_batch_size=B, max_seq_len=T,
        total_batch_size=total_batch_size, world_size=run.world_size))
    schedule = lambda it, progress: dict(  # noqa: E731
        lrm=training.lr_multiplier(it, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac),
        momentum=training.muon_momentum(it, num_iterations, args.warmdown_ratio),
        weight_decay=training.muon_weight_decay(it, num_iterations, plan.weight_decay))
    train = TrainLoop(
        step=step, batches=train_loader, horizon=num_iterations, schedule=schedule,
        periodic=[job for job in (Periodic("val bpb", args.eval_every, val_bpb, at_start=True),
                                  Periodic("CORE", args.core_metric_every, core_metric),
                                  Periodic("samples", args.sample_every, samples, master_only=True))
                  if job.every > 0],  # -1 disables a job
        checkpointer=checkpointer, meter=run.meter(total_batch_size, num_flops_per_token),
        wandb_run=run.wandb_run, sync=run.sync,
        describe=lambda st: f"epoch: {st['epoch']} pq: {st['pq_idx']} rg: {st['rg_idx']}", curve="base")
    result = train.run(resume=meta)

    get_report().log(section="Base model training", data=[
        user_config,
        {
            "Number of parameters": param_counts["total"],
            "Number of FLOPs per token": f"{num_flops_per_token:e}",
            "Calculated number of iterations": num_iterations,
            "Number of training tokens": total_batch_size * num_iterations,
            "Tokens : Scaling params ratio": total_batch_size * num_iterations / scaling_params(orig_model),
            "DDP world size": run.world_size,
            "Device batch size": B,
            "warmup_steps": args.warmup_steps,
            "warmdown_ratio": args.warmdown_ratio,
            "final_lr_frac": args.final_lr_frac,
        },
        {
            "CORE metric estimate": result.metrics.get("core_metric"),
            "Total training flops": f"{num_flops_per_token * total_batch_size * num_iterations:e}",
            **result.report_rows(),
        },
    ])
    run.finish()
    return result


if __name__ == "__main__":
    main()
