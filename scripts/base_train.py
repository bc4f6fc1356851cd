"""
Pretrain the base GPT from scratch.

One GPU / CPU:   python -m scripts.base_train --depth=12
Many GPUs:       torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24 --fp8
Tiny CPU run:    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=8 --num-iterations=50

`--depth` is the one dial: width, heads, batch size, horizon, learning rates and weight decay follow
from it (see nanochat/training.py for the scaling rules and the papers behind them).
"""

import argparse
import gc
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import asdict

import torch

from nanochat import training
from nanochat.common import (DummyWandb, autodetect_device_type, compute_cleanup, compute_init, get_base_dir,
                             get_compute_dtype, get_peak_flops, measure_matmul_flops, print_banner,
                             setup_default_logging)

log = logging.getLogger("nanochat.base_train")


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain the base model. Derived values (width, batch, LR, WD, horizon) are printed at startup.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("logging and runtime")
    g.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    g.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    g.add_argument("--fp8", action="store_true", help="FP8 training of the big matmuls (CUDA SM>=8.9 only)")
    g.add_argument("--fp8-recipe", type=str, default="tensorwise", help="FP8 scaling recipe (only 'tensorwise' is implemented)")
    g.add_argument("--compile", type=str, default="auto", choices=["auto", "on", "off"], help="torch.compile the model (auto = on for CUDA, off elsewhere)")
    g.add_argument("--seed", type=int, default=42, help="seed of the weight init (pretraining reads the shards in a fixed order)")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers")
    g.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio, rounded up to a multiple of head_dim")
    g.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    g.add_argument("--window-pattern", type=str, default="SSSL", help="per-layer attention windows tiled over layers: L=full context, S=quarter context; the last layer is always L")
    g = p.add_argument_group("horizon (first positive one wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps (-1 = derive)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="derive steps from a FLOPs budget (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens = ratio * scaling params (-1 = off)")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=32, help="rows per micro-batch per rank")
    g.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = auto from depth)")
    g.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR of the token embedding (value embeddings get half)")
    g.add_argument("--unembedding-lr", type=float, default=0.008, help="AdamW LR of lm_head")
    g.add_argument("--weight-decay", type=float, default=0.28, help="reference Muon weight decay (scaled with batch and horizon)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the transformer matrices")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="LR of the x0 lambdas (resid lambdas get 0.01x)")
    g.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
    g.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps in the final linear LR warmdown")
    g.add_argument("--final-lr-frac", type=float, default=0.05, help="LR multiplier at the end of warmdown")
    g.add_argument("--resume-from-step", type=int, default=-1, help="resume from this checkpoint step (-1 = start fresh)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = disable)")
    g.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens per val bpb evaluation")
    g.add_argument("--core-metric-every", type=int, default=2000, help="CORE metric every N steps (-1 = disable)")
    g.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1 = all)")
    g.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1 = disable)")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    return p


def _peak_flops(device, compute_dtype, world_size):
    """Aggregate peak FLOP/s for MFU: the GPU's datasheet number, or this CPU's measured matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = get_peak_flops(name)
        log.info("GPU: %s | peak bf16 FLOP/s: %s", name, f"{peak:.3e}" if peak else "unknown")
        return peak * world_size if peak else None
    peak = measure_matmul_flops(device, compute_dtype)
    log.info("CPU: measured %s matmul rate %.3e FLOP/s (used as the MFU peak)", str(compute_dtype).removeprefix("torch."), peak)
    return peak * world_size


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    user_config = vars(args).copy()

    from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
    from nanochat.dataloader import (gather_loader_states, tokenizing_distributed_data_loader_bos_bestfit,
                                     tokenizing_distributed_data_loader_with_state_bos_bestfit)
    from nanochat.engine import complete_prompts
    from nanochat.gpt import GPT
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.report import get_report
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    device_type = args.device_type or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
    if device.type == "cpu":
        # Split the cores between CPU ranks (torchrun + gloo); oversubscribed matmul threads only thrash.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = training.configure_cpu_threads(max(1, cores // world_size))
        log.info("CPU: %d torch threads per rank, denormals flushed to zero", threads)
    master = rank == 0
    if master:
        print_banner()
    compute_dtype, dtype_reason = get_compute_dtype()
    log.info("Compute dtype: %s (%s)", compute_dtype, dtype_reason)
    peak_flops = _peak_flops(device, compute_dtype, world_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    if args.run != "dummy" and master:
        import wandb
        wandb_run = wandb.init(project="nanochat", name=args.run, config=user_config)
    else:
        wandb_run = DummyWandb()

    from nanochat.flash_attention import fa3_status
    fa3_available, fa3_reason = fa3_status()  # also loads FA3 now, before any compile sees the attention call
    log.info("Flash Attention 3: %s", "in use" if fa3_available else f"not in use ({fa3_reason}); attention runs on PyTorch SDPA")
    if not fa3_available and args.window_pattern.upper() != "L":
        log.warning("SDPA has no efficient sliding-window kernel: --window-pattern %s runs masked attention; "
                    "--window-pattern L is usually faster without FA3", args.window_pattern)

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
    model_config = model.config
    log.info("Model config: %s", json.dumps(asdict(model_config)))
    model.to_empty(device=device)
    model.init_weights()
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    resuming = args.resume_from_step >= 0
    if resuming:
        log.info("Resuming from step %d of %s", args.resume_from_step, checkpoint_dir)
        model_data, optim_data, meta = load_checkpoint(checkpoint_dir, args.resume_from_step, device, load_optimizer=True, rank=rank)
        model.load_state_dict(model_data, strict=True, assign=True)
        del model_data

    if args.fp8:
        from nanochat import fp8
        if device.type != "cuda":
            log.warning("--fp8 needs CUDA; ignoring it on %s", device.type)
        else:
            converted, skipped = fp8.convert_to_float8_training(model, recipe=args.fp8_recipe)
            log.info("FP8: converted %d linear layers, kept %d in %s", converted, skipped, compute_dtype)
    orig_model = model
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if use_compile:
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
    grad_accum_steps = training.grad_accum_steps_for(total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
    log.info("Total batch size %s => gradient accumulation steps: %d", f"{total_batch_size:,}", grad_accum_steps)
    log.info("Batch LR scale: %.6f | scaled weight decay: %.6f | iterations: %s | tokens: %s | tokens:scaling-params %.2f | total FLOPs %e",
             plan.batch_lr_scale, plan.weight_decay, f"{num_iterations:,}", f"{total_batch_size * num_iterations:,}",
             total_batch_size * num_iterations / scaling_params(orig_model), num_flops_per_token * total_batch_size * num_iterations)

    s = plan.batch_lr_scale
    optimizer = orig_model.setup_optimizer(unembedding_lr=args.unembedding_lr * s, embedding_lr=args.embedding_lr * s,
                                           scalar_lr=args.scalar_lr * s, matrix_lr=args.matrix_lr * s,
                                           weight_decay=plan.weight_decay)
    if resuming:
        optimizer.load_state_dict(optim_data)
        del optim_data
    scaler = torch.amp.GradScaler() if compute_dtype == torch.float16 else None
    train_step = training.TrainStep(model, optimizer, scaler=scaler, log=log.warning)

    B, T = args.device_batch_size, args.max_seq_len
    train_loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split="train", device=device, resume_state_dict=meta["dataloader_state_dict"] if resuming else None)
    build_val_loader = lambda: tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, split="val", device=device)

    meter = training.StepMeter(num_iterations, total_batch_size, num_flops_per_token, peak_flops)
    step, val_bpb, min_val_bpb, core_metric = 0, None, float("inf"), None
    dataloader_state = None
    if resuming:
        step, val_bpb = meta["step"], meta["val_bpb"]
        min_val_bpb = meta["loop_state"]["min_val_bpb"]
        meter.load_state_dict(meta["loop_state"]["meter"])
        dataloader_state = meta["dataloader_state_dict"]
    last_metrics, lrm = None, 1.0

    def disable_fp8():
        if args.fp8 and device.type == "cuda":
            from nanochat import fp8
            return fp8.disable_fp8(orig_model)
        return nullcontext()

    while True:
        last_step = step == num_iterations
        flops_so_far = num_flops_per_token * total_batch_size * step

        # once in a while: validation bits per byte
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            model.eval()
            eval_steps = max(1, args.eval_tokens // (B * T * world_size))
            with disable_fp8():
                val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
            log.info("Step %05d | Validation bpb: %.6f", step, val_bpb)
            min_val_bpb = min(min_val_bpb, val_bpb)
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": meter.total_time, "val/bpb": val_bpb})
            model.train()

        # once in a while: CORE metric (all ranks take part)
        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            from nanochat.core_eval import evaluate_core
            orig_model.eval()
            with disable_fp8():
                results = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
            core_metric = results["core_metric"]
            log.info("Step %05d | CORE metric: %.4f", step, core_metric)
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": core_metric,
                           "centered_results": results["centered_results"]})
            orig_model.train()

        # once in a while: greedy samples (rank 0)
        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            orig_model.eval()
            with disable_fp8():
                for text in complete_prompts(orig_model, tokenizer):
                    log.info("sample: %s", text)
            orig_model.train()

        # once in a while: checkpoint (every rank writes its optimizer shard)
        if last_step or (step > 0 and step != args.resume_from_step and args.save_every > 0 and step % args.save_every == 0):
            meta_data = dict(step=step, val_bpb=val_bpb, model_config=asdict(model_config), user_config=user_config,
                             device_batch_size=B, max_seq_len=T, total_batch_size=total_batch_size,
                             world_size=world_size, dataloader_state_dict=gather_loader_states(dataloader_state),
                             loop_state=dict(min_val_bpb=min_val_bpb, meter=meter.state_dict()))
            save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), optimizer.state_dict(), meta_data, rank=rank)
            log.info("Saved checkpoint for step %d to %s", step, checkpoint_dir)

        if last_step:
            break

        # the optimizer step
        micro_batches = []
        for _ in range(grad_accum_steps):
            x, y, dataloader_state = next(train_loader)
            micro_batches.append((x.clone(), y.clone()))  # the loader reuses its buffers; the step may need to replay them
        lrm = training.lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        training.apply_schedule(optimizer, lrm, momentum=training.muon_momentum(step, num_iterations, args.warmdown_ratio),
                                weight_decay=training.muon_weight_decay(step, num_iterations, plan.weight_decay))
        meter.start(sync)
        try:
            train_loss = train_step(micro_batches)
        except training.NonFiniteLossError as err:
            log.error("Step %05d: %s", step, err)
            compute_cleanup()
            raise SystemExit(1) from None
        last_metrics = meter.stop(step, train_loss, sync)

        position = f"epoch: {dataloader_state['epoch']} pq: {dataloader_state['pq_idx']} rg: {dataloader_state['rg_idx']}"
        log.info(training.format_step_line(step, num_iterations, last_metrics, lrm, position, meter.total_time))
        if step % 100 == 0:
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": meter.total_time,
                           "train/loss": last_metrics["loss"], "train/lrm": lrm, "train/dt": last_metrics["dt"],
                           "train/tok_per_sec": last_metrics["tok_per_sec"], "train/mfu": last_metrics["mfu"], "train/epoch": position})

        # Python's GC scans the huge, long-lived object graph every few hundred ms; freeze it after the first step.
        first_step_of_run = step == 0 or (resuming and step == args.resume_from_step)
        step += 1
        if first_step_of_run:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    peak_mem = torch.cuda.max_memory_allocated() / 1024**2 if device.type == "cuda" else None
    avg_tok_per_sec = meter.avg_tok_per_sec()
    log.info("Peak memory usage: %s", f"{peak_mem:.2f}MiB" if peak_mem is not None else "n/a (not CUDA)")
    log.info("Total training time: %.2fm | average tok/sec: %s", meter.total_time / 60, f"{avg_tok_per_sec:,.0f}" if avg_tok_per_sec else "n/a")
    if val_bpb is not None:
        log.info("Minimum validation bpb: %.6f", min_val_bpb)

    mfu = last_metrics["mfu"] if last_metrics else None
    get_report().log(section="Base model training", data=[
        user_config,
        {
            "Number of parameters": param_counts["total"],
            "Number of FLOPs per token": f"{num_flops_per_token:e}",
            "Calculated number of iterations": num_iterations,
            "Number of training tokens": total_batch_size * num_iterations,
            "Tokens : Scaling params ratio": total_batch_size * num_iterations / scaling_params(orig_model),
            "DDP world size": world_size,
            "warmup_steps": args.warmup_steps,
            "warmdown_ratio": args.warmdown_ratio,
            "final_lr_frac": args.final_lr_frac,
        },
        {
            "Minimum validation bpb": min_val_bpb if val_bpb is not None else None,
            "Final validation bpb": val_bpb,
            "CORE metric estimate": core_metric,
            "MFU %": f"{mfu:.2f}%" if mfu is not None else "n/a",
            "Total training flops": f"{num_flops_per_token * total_batch_size * num_iterations:e}",
            "Total training time": f"{meter.total_time / 60:.2f}m",
            "Average tok/sec": f"{avg_tok_per_sec:,.0f}" if avg_tok_per_sec else "n/a",
            "Peak memory usage": f"{peak_mem:.2f}MiB" if peak_mem is not None else "n/a",
        },
    ])
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
