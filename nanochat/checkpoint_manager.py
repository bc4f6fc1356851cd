"""
Checkpoints: save and load model / optimizer / meta files, find the newest one, rebuild a GPT from it.

Layout, under <base>/<source dir (SOURCE_DIRS)>/<model_tag, default d<depth>>/:
    model_{step:06d}.pt              model state_dict (rank 0)
    meta_{step:06d}.json             step, model_config, user_config, loop/loader state (rank 0), written last
    optim_{step:06d}_rank{r}.pt      optimizer state shard of rank r (every rank; state is sharded)

    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag="d12", step=5000)  # None = newest
"""

import json
import logging
import os
import pickle
import re
import zipfile

import torch
import torch.distributed as dist

from nanochat.common import (UserError, atomic_torch_save, atomic_write, get_base_dir, get_compute_dtype, get_inference_dtype,
                             dist_world_size, strict_json)

log = logging.getLogger(__name__)

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
_PRODUCERS = dict(zip(SOURCE_DIRS.values(), ("base_train", "mid_train", "chat_sft", "chat_rl")))  # dir -> the script that writes it
_MODEL_RE = re.compile(r"model_(\d+)\.pt")


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No checkpoint where one was asked for (message says which file/dir and how to make one)."""


class CheckpointCorruptError(UserError, RuntimeError):
    """A checkpoint file exists but cannot be read, or does not fit the current model."""


class CheckpointMismatchError(UserError, ValueError):
    """A readable checkpoint that does not go with what it is used with (e.g. another tokenizer's vocab)."""


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")


def get_checkpoints_dir(source):
    """<base>/<dir> holding one sub-directory per model tag for a source: base, mid, sft or rl."""
    if source not in SOURCE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; use one of {', '.join(SOURCE_DIRS)}")
    return os.path.join(get_base_dir(), SOURCE_DIRS[source])


def add_checkpoint_flags(group, default="base", sources=tuple(SOURCE_DIRS), source_help="checkpoint family to load",
                         training=False):
    """-i/--source, -g/--model-tag and -s/--step: which checkpoint a script loads. default=None makes -i required,
    sources=() leaves it out; training stages, which also save under the tag, name the step -s/--model-step."""
    if sources:
        group.add_argument("-i", "--source", choices=sources, default=default, required=default is None, help=source_help)
    if training:
        group.add_argument("-g", "--model-tag", type=str, default=None, help="tag to load and to save under (default: the source's largest d<N>)")
        group.add_argument("-s", "--model-step", type=int, default=None, help="source checkpoint step (default: the last one)")
    else:
        group.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint directory tag (default: the largest d<N>)")
        group.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last one)")


def _how_to_make(path):  # "run <script> first" for the stage that writes checkpoints under `path`
    for part in reversed(os.path.normpath(path).split(os.sep)):
        if part in _PRODUCERS:
            return f"run `python -m scripts.{_PRODUCERS[part]}` first"
    return "train a model first"


# -----------------------------------------------------------------------------
# Saving and loading files


def _barrier():
    if dist_world_size() > 1:
        dist.barrier()


_swept_dirs = set()  # checkpoint dirs whose stale temporaries this process has removed


def remove_stale_temporaries(checkpoint_dir):
    """Delete the temp files (.model_*.pt.<random>.tmp and the like) a save killed midway left, each as big as the
    model; returns how many. Only call it when no save is running."""
    stale = [e for e in os.scandir(checkpoint_dir) if e.is_file() and e.name.endswith(".tmp")
             and e.name.startswith((".model_", ".meta_", ".optim_"))]
    size = sum(e.stat().st_size for e in stale)
    for entry in stale:
        os.remove(entry.path)
    if stale:
        log.info("Removed %d temporary file(s) (%.2f GB) left by an interrupted save in %s", len(stale), size / 1e9,
                 checkpoint_dir)
    return len(stale)


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Write one checkpoint step: rank 0 the model and meta, each rank its optimizer shard (if not None). Every rank
    calls this. Each file is a temp file renamed into place: a crash mid-save never leaves a half file."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if checkpoint_dir not in _swept_dirs:  # every rank keeps the same set, so all take this barrier together
        _swept_dirs.add(checkpoint_dir)
        if rank == 0:
            remove_stale_temporaries(checkpoint_dir)
        _barrier()  # no rank starts a temp file of its own before the sweep is done
    if rank == 0:
        atomic_torch_save(model_data, model_path(checkpoint_dir, step))
    if optimizer_data is not None:
        atomic_torch_save(optimizer_data, optim_path(checkpoint_dir, step, rank))
    _barrier()  # the meta goes last, after every rank's files: a step whose meta exists is complete
    if rank == 0:
        # Strict JSON (NaN / inf become null): the meta must load in any JSON parser, not only Python's.
        atomic_write(meta_path(checkpoint_dir, step), strict_json(meta_data, indent=2, ensure_ascii=False))
        log.info("Saved checkpoint step %d to %s", step, checkpoint_dir)
    _barrier()  # no rank moves on (or exits) before the checkpoint is on disk


def _corrupt(path, err):
    return CheckpointCorruptError(f"checkpoint file {path} is corrupt or truncated ({type(err).__name__}: {err}); "
                                  f"delete it or resume from an earlier step")


def _torch_load(path, device):
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise _corrupt(path, e) from e


def _load_meta(path):
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint meta file {path} is missing (the save did not finish); "
                                      f"resume from an earlier step")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from e
    if not isinstance(meta, dict):
        raise _corrupt(path, ValueError("the meta file does not hold a JSON object"))
    return meta


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_data, optimizer_data or None, meta_data) of one step, tensors mapped to `device`."""
    path = model_path(checkpoint_dir, step)
    if not os.path.exists(path):
        steps = _complete_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
        have = f"steps present: {', '.join(map(str, steps))}" if steps else _how_to_make(checkpoint_dir)
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir} ({os.path.basename(path)} "
                                      f"is missing); {have}")
    meta = _load_meta(meta_path(checkpoint_dir, step))
    model_data = _torch_load(path, device)
    optimizer_data = _torch_load(optim_path(checkpoint_dir, step, rank), device) if load_optimizer else None
    return model_data, optimizer_data, meta


# -----------------------------------------------------------------------------
# Finding checkpoints


def _complete_steps(checkpoint_dir):  # sorted steps with both a model and a meta file
    steps = []
    for name in os.listdir(checkpoint_dir):
        m = _MODEL_RE.fullmatch(name)
        if m is None:
            continue
        step = int(m.group(1))
        if os.path.exists(meta_path(checkpoint_dir, step)):
            steps.append(step)
        else:
            log.warning("Ignoring %s: its meta file is missing (the save did not finish)", os.path.join(checkpoint_dir, name))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    """The largest step in `checkpoint_dir` whose model and meta files both exist."""
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointNotFoundError(f"no checkpoint directory {checkpoint_dir}; {_how_to_make(checkpoint_dir)}")
    steps = _complete_steps(checkpoint_dir)
    if not steps:
        raise CheckpointNotFoundError(f"no checkpoints in {checkpoint_dir}; {_how_to_make(checkpoint_dir)}")
    return steps[-1]


def find_largest_model(checkpoints_dir):
    """The model tag to load when none is given: the largest d<N> (prefix match, so d24_jan29 is 24; the newest
    among equal N), else the most recently modified tag. Tags without a model file are ignored."""
    if not os.path.isdir(checkpoints_dir):
        raise CheckpointNotFoundError(f"no checkpoint directory {checkpoints_dir}; {_how_to_make(checkpoints_dir)}")
    tags = []
    for tag in os.listdir(checkpoints_dir):
        path = os.path.join(checkpoints_dir, tag)
        if os.path.isdir(path) and any(_MODEL_RE.fullmatch(n) for n in os.listdir(path)):
            tags.append((tag, os.path.getmtime(path)))
    if not tags:
        raise CheckpointNotFoundError(f"no checkpoints in {checkpoints_dir}; {_how_to_make(checkpoints_dir)}")
    depth_tags = [(int(m.group(1)), mtime, tag) for tag, mtime in tags if (m := re.match(r"d(\d+)", tag))]
    if depth_tags:
        return max(depth_tags)[2]
    return max(tags, key=lambda t: t[1])[0]


def resolve_checkpoint(source, model_tag=None, step=None):
    """(checkpoint_dir, model_tag, step) that load_model(source, ...) loads: the largest tag and last step unless given."""
    checkpoints_dir = get_checkpoints_dir(source)
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
        log.info("No model tag given, using %s", model_tag)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        available = sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []
        raise CheckpointNotFoundError(f"no model tag {model_tag!r} in {checkpoints_dir} (available: "
                                      f"{', '.join(available) or 'none'}); {_how_to_make(checkpoints_dir)}")
    if step is None:
        step = find_last_step(checkpoint_dir)
        log.info("No step given, using the last one: %d", step)
    return checkpoint_dir, model_tag, step


# -----------------------------------------------------------------------------
# Rebuilding the model


def _patch_missing_keys(model_data, expected, path):
    # Neutral values for parameters added after a checkpoint was written: resid 1 / x0 0 reproduce the
    # plain residual stream, smear_lambda 0 turns the smear off and backout_lambda 0 the backout.
    defaults = {"resid_lambdas": torch.ones_like, "x0_lambdas": torch.zeros_like, "smear_lambda": torch.zeros_like,
                "smear_gate.weight": torch.zeros_like, "backout_lambda": torch.zeros_like}
    for key, make in defaults.items():
        if key in expected and key not in model_data:
            log.info("%s predates %s: using the neutral value", path, key)
            model_data[key] = make(expected[key])


def build_model(checkpoint_dir, step, device, phase):
    """(model, tokenizer, meta) from one checkpoint step; phase "train" or "eval" sets the module mode and the
    dtype: the training compute dtype, or the device's faster inference dtype (fp32 on CPU)."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    path = model_path(checkpoint_dir, step)
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}  # saved from a torch.compile'd model
    config_kwargs = dict(meta["model_config"])
    if "window_pattern" not in config_kwargs:
        log.info("%s has no window_pattern in its config: using 'L' (full context, as it was trained)", path)
        config_kwargs["window_pattern"] = "L"
    config = GPTConfig(**config_kwargs)
    dtype = get_compute_dtype()[0] if phase == "train" else get_inference_dtype(device.type)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()  # the rotary tables are buffers, not in the checkpoint
    expected = model.state_dict()
    _patch_missing_keys(model_data, expected, path)
    for key, value in model_data.items():  # a fresh model's dtype on this device (bf16 becomes fp32 on an fp32 CPU)
        if key in expected and value.is_floating_point() and value.dtype != expected[key].dtype:
            model_data[key] = value.to(expected[key].dtype)
    try:
        model.load_state_dict(model_data, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointCorruptError(f"checkpoint {path} does not fit the model built from its meta ({' '.join(str(e).split())}); it was "
                                     f"written by an incompatible version of nanochat") from e
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointMismatchError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but checkpoint {path} was "
                                      f"trained with {config.vocab_size}; use the tokenizer the model was trained with "
                                      "(or retrain the model with this one)")
    return model, tokenizer, meta


def load_model(source, device, phase, model_tag=None, step=None):
    """(model, tokenizer, meta) for source base, mid, sft or rl: the largest tag and last step unless given."""
    checkpoint_dir, _, step = resolve_checkpoint(source, model_tag, step)
    return build_model(checkpoint_dir, step, device, phase)


def load_optimizer_state(source, device, rank, model_tag=None, step=None, required=False):
    """This rank's optimizer shard of a checkpoint, or None (logged) if it has none; `required`: that is an error."""
    checkpoint_dir, _, step = resolve_checkpoint(source, model_tag, step)
    path = optim_path(checkpoint_dir, step, rank)
    if not os.path.exists(path):
        if required:
            raise CheckpointNotFoundError(f"no optimizer state for rank {rank} at {path}: resuming needs the shard of every "
                                          "rank, so resume with the number of processes the checkpoint was saved with")
        log.info("No optimizer state at %s; the optimizer starts fresh", path)
        return None
    return _torch_load(path, device)
