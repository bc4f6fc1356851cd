"""
Midtraining and SFT: one runner (run_stage) for the `Stage`s of scripts/mid_train.py and scripts/chat_sft.py;
RL reuses `load_start` and `make_optimizer`. The horizon is one epoch of the conversation mixture unless
--num-iterations is given, and the LR follows the progress through it.
"""

import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from nanochat import training
from nanochat.chat_dataloader import packed_conversation_loader, training_progress
from nanochat.chateval import evaluate_available_chatcore
from nanochat.checkpoint_manager import add_checkpoint_flags, get_checkpoints_dir, load_model, load_optimizer_state, resolve_checkpoint
from nanochat.common import add_runtime_flags
from nanochat.engine import Engine
from nanochat.flash_attention import log_attention_plan
from nanochat.loop import Checkpointer, Periodic, TrainLoop, start_run, token_batch_step
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import ShardMismatchError
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from tasks.common import fallbacks_used

log = logging.getLogger(__name__)

# What a flag left at None inherits from the source checkpoint (SFT), and the value when the source has none.
INHERITED = {"max_seq_len": 2048, "device_batch_size": "auto", "total_batch_size": 524288,
             "embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}


@dataclass(frozen=True)
class Stage:
    """What makes midtraining midtraining and SFT SFT."""

    name: str  # checkpoint source this stage writes: "mid" | "sft"
    title: str  # report section
    wandb_project: str
    mask_mode: str  # "all" (every token is a target) | "assistant" (completion-only)
    mixture: Callable  # (split, args) -> Task
    sources: tuple  # checkpoint sources it may start from; the first is the default
    chatcore: bool = False  # a ChatCORE check beside val bpb (SFT; its --chatcore-* flags)


def add_flags(p, stage, defaults):
    """The flags both stages share; `defaults` holds the stage's values (None = inherit from the source)."""
    g = p.add_argument_group("logging and runtime")
    add_runtime_flags(g, seed_help="seed of torch's generators (the data order is fixed by the mixture)")
    g.add_argument("--dry-run", action="store_true", help="train and evaluate but write no checkpoint and no report section")
    g = p.add_argument_group("checkpoints")
    add_checkpoint_flags(g, default=stage.sources[0], sources=stage.sources, source_help="checkpoint to start from", training=True)
    g.add_argument("--resume-from-step", type=int, default=-1, help="resume from this step of this stage's own checkpoints (-1 = start from --source)")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    inherit = " (default: the source checkpoint's)" if defaults["max_seq_len"] is None else ""
    g = p.add_argument_group("optimization" + inherit)
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch of the mixture)")
    g.add_argument("--max-seq-len", type=int, default=defaults["max_seq_len"], help="row length in tokens")
    training.add_device_batch_size_flag(g, defaults["device_batch_size"])
    g.add_argument("--total-batch-size", type=int, default=defaults["total_batch_size"], help="tokens per optimizer step, all ranks")
    training.add_lr_flags(g, stage.name)
    g.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay")
    g.add_argument("--init-lr-frac", type=float, default=defaults["init_lr_frac"], help="every LR is this fraction of the above")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of progress in linear LR warmup")
    g.add_argument("--warmdown-ratio", type=float, default=defaults["warmdown_ratio"], help="fraction of progress in the final linear warmdown")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=defaults["eval_every"], help="val bpb every N steps (-1 = only at the end)")
    g.add_argument("--eval-tokens", type=int, default=defaults["eval_tokens"], help="tokens per val bpb evaluation")
    return p


# -----------------------------------------------------------------------------
# Setup pieces RL shares


@dataclass
class Start:
    model: torch.nn.Module
    tokenizer: object
    meta: dict  # meta of the checkpoint loaded
    source: str  # the checkpoint source it came from
    source_tag: str
    source_step: int
    tag: str  # this stage saves under <its dir>/<tag>
    resume: dict | None  # the meta to resume the loop from, or None for a fresh start


def load_start(stage_name, source, model_tag, model_step, resume_from_step, device):
    """The source checkpoint to start from (phase "train"), or this stage's own one when resuming."""
    if resume_from_step >= 0:
        _, tag, step = resolve_checkpoint(stage_name, model_tag, resume_from_step)
        model, tokenizer, meta = load_model(stage_name, device, phase="train", model_tag=tag, step=step)
        log.info("Resuming %s from step %d of %s", stage_name, step, os.path.join(get_checkpoints_dir(stage_name), tag))
        return Start(model, tokenizer, meta, stage_name, tag, step, tag, meta)
    _, source_tag, step = resolve_checkpoint(source, model_tag, model_step)
    model, tokenizer, meta = load_model(source, device, phase="train", model_tag=source_tag, step=step)
    log.info("Starting from the %s checkpoint %s, step %d", source, source_tag, step)
    return Start(model, tokenizer, meta, source, source_tag, step, model_tag or source_tag, None)


def make_optimizer(model, lrs, weight_decay, init_lr_frac, warm_start=None):
    """MuonAdamW at `lrs` x init_lr_frac, its moments taken from the optimizer shard `warm_start` when given
    (the fresh learning rates kept; a shard of another world size is skipped)."""
    optimizer = model.setup_optimizer(unembedding_lr=lrs["unembedding_lr"], embedding_lr=lrs["embedding_lr"],
                                      matrix_lr=lrs["matrix_lr"], weight_decay=weight_decay)
    if warm_start is not None:
        fresh = [g["lr"] for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(warm_start)
        except ShardMismatchError as err:
            log.warning("Not warm-starting the optimizer (%s); starting with fresh moments", err)
        for group, lr in zip(optimizer.param_groups, fresh):
            group["lr"] = lr
    for group in optimizer.param_groups:
        group["lr"] *= init_lr_frac
        group["initial_lr"] = group["lr"]
    return optimizer


def resolve_hyperparameters(args, source_meta, resume):
    """Each flag left at None takes the source checkpoint's value; a resumed run takes what the run it resumes used."""
    if resume is not None:
        return dict(resume["hyperparameters"])
    out = {}
    for name, fallback in INHERITED.items():
        given = getattr(args, name)
        pretrained = source_meta.get(name, source_meta.get("user_config", {}).get(name))
        if given is None:
            out[name] = pretrained if pretrained is not None else fallback
        else:
            out[name] = given
            if pretrained is not None and given != pretrained:
                log.info("NOTE: --%s=%s overrides the source checkpoint's %s", name.replace("_", "-"), given, pretrained)
    return out


# -----------------------------------------------------------------------------
# The runner


def run_stage(stage, args):
    """Train one finetuning stage end to end; returns the loop's LoopResult."""
    user_config = vars(args).copy()
    run = start_run(args.device_type, args.seed, stage.wandb_project, args.run, user_config)
    device = run.device
    start = load_start(stage.name, args.source, args.model_tag, args.model_step, args.resume_from_step, device)
    model, tokenizer, source_meta, tag, resume = start.model, start.tokenizer, start.meta, start.tag, start.resume
    log_attention_plan(device, run.compute_dtype, model.config.window_pattern)
    hp = resolve_hyperparameters(args, source_meta, resume)
    if isinstance(source_meta.get("device_batch_size"), int) and isinstance(hp["device_batch_size"], int) \
            and hp["device_batch_size"] > source_meta["device_batch_size"]:
        log.warning("--device-batch-size %d is larger than the %d the source trained with: it may not fit in memory",
                    hp["device_batch_size"], source_meta["device_batch_size"])
    orig_model = model  # for evaluations with varying shapes and saving; `model` may be compiled
    if device.type == "cuda":
        model = torch.compile(model, dynamic=False)

    warm = None
    if resume is None and getattr(args, "load_optimizer", 0):
        warm = load_optimizer_state(start.source, device, run.rank, model_tag=start.source_tag, step=start.source_step)
        if warm is None:
            log.warning("The source checkpoint has no optimizer state for rank %d: starting with fresh moments (slightly worse)", run.rank)
    optimizer = make_optimizer(orig_model, hp, args.weight_decay, args.init_lr_frac, warm_start=warm)
    T = hp["max_seq_len"]
    step, B = token_batch_step(run, model, optimizer, hp["device_batch_size"], hp["total_batch_size"], T, tokenizer.get_vocab_size())
    hp["device_batch_size"] = B
    if resume is not None:
        optimizer.load_state_dict(load_optimizer_state(stage.name, device, run.rank, model_tag=tag, step=start.source_step, required=True))

    train_data = stage.mixture("train", args)
    val_data = stage.mixture("val", args)
    log.info("Training mixture: %s conversations; validation: %s", f"{len(train_data):,}", f"{len(val_data):,}")
    batches = packed_conversation_loader(train_data, tokenizer, B, T, mask_mode=stage.mask_mode, device=device, split="train",
                                         resume_state_dict=(resume or {}).get("dataloader_state_dict"))
    horizon = args.num_iterations if args.num_iterations > 0 else (
        lambda state: training_progress(state, -1, batches_per_step=step.grad_accum_steps))
    token_bytes = get_token_bytes(device=device)

    def val_bpb(step):
        model.eval()
        # A fresh loader each time: every evaluation reads the same conversations.
        loader = packed_conversation_loader(val_data, tokenizer, B, T, mask_mode=stage.mask_mode, device=device, split="val")
        bpb = evaluate_bpb(model, loader, training.eval_steps_for(args.eval_tokens, B, T, run.world_size), token_bytes)
        model.train()
        log.info("Step %05d | Validation bpb: %.6f", step, bpb)
        return {"val_bpb": bpb}

    def chatcore(step):
        orig_model.eval()  # uncompiled: prompt shapes vary
        scores = evaluate_available_chatcore(orig_model, tokenizer, Engine(orig_model, tokenizer), batch_size=B,
                                             max_categorical=None if args.chatcore_max_cat < 0 else args.chatcore_max_cat,
                                             max_generative=None if args.chatcore_max_sample < 0 else args.chatcore_max_sample)
        orig_model.train()
        log.info("Step %05d | %s", step, " | ".join(f"{name}: {100 * acc:.2f}%" for name, acc in scores["accuracies"].items()))
        log.info("Step %05d | ChatCORE: %s | ChatCORE_cat: %s", step, _fmt(scores["chatcore"]), _fmt(scores["chatcore_cat"]))
        return {"chatcore_metric": scores["chatcore"], "chatcore_cat": scores["chatcore_cat"],
                **{f"chatcore/{name}": acc for name, acc in scores["accuracies"].items()}}

    # --eval-every -1 still evaluates at the end; --chatcore-every -1 never runs ChatCORE.
    periodic = [Periodic("val bpb", args.eval_every, val_bpb, at_start=args.eval_every > 0)]
    if stage.chatcore and args.chatcore_every > 0:
        periodic.append(Periodic("ChatCORE", args.chatcore_every, chatcore))
    checkpointer = None if args.dry_run else Checkpointer(
        os.path.join(get_checkpoints_dir(stage.name), tag), args.save_every, orig_model, optimizer,
        meta=dict(model_config=asdict(orig_model.config), user_config=user_config, hyperparameters=hp, device_batch_size=B,
                  max_seq_len=T, total_batch_size=hp["total_batch_size"], world_size=run.world_size, source=args.source))
    schedule = lambda step, progress: dict(  # noqa: E731
        lrm=training.progress_lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac),
        momentum=training.momentum_warmup(step))
    result = TrainLoop(step=step, batches=batches, horizon=horizon, schedule=schedule, periodic=periodic, checkpointer=checkpointer,
                       meter=run.meter(hp["total_batch_size"], orig_model.estimate_flops()),
                       wandb_run=run.wandb_run, sync=run.sync, wandb_every=10,
                       describe=lambda state: f"epoch: {state['epoch']}", curve=stage.name).run(resume=resume)
    if batches.truncated:
        log.info("%d conversations longer than a row (%d tokens) were truncated to it", batches.truncated, T + 1)

    if not args.dry_run:
        get_report().log(section=stage.title, data=[
            user_config,
            {"Source checkpoint": f"{args.source} {tag}", "Training rows": len(train_data), "Number of iterations": result.step,
             "DDP world size": run.world_size, "Device batch size": B, "Gradient accumulation steps": step.grad_accum_steps,
             "Conversations truncated to the row": batches.truncated,
             "Offline stand-ins": "; ".join(fallbacks_used()) or "none"},
            {**({"ChatCORE metric": result.metrics.get("chatcore_metric"), "ChatCORE_cat": result.metrics.get("chatcore_cat")}
                if stage.chatcore else {}), **result.report_rows()},
        ])
    run.finish()
    return result


def _fmt(value):
    return "n/a (some tasks unavailable)" if value is None else f"{value:.4f}"
