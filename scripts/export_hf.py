"""
Export a checkpoint as a Hugging Face folder that `transformers` loads (weights in safetensors, the model code,
config.json, tokenizer.json and the chat template); optionally upload it to the hub.

    python -m scripts.export_hf -i sft --out hf/d20-sft
    python -m scripts.export_hf -i base -g d20 -s 5000 --out hf/d20-base --dtype bfloat16
    python -m scripts.export_hf -i sft --out hf/d20-sft --push-to-hub you/nanochat-d20   # needs `hf auth login`

Needs the `export` extra: `uv sync --extra export`. Then:
    AutoModelForCausalLM.from_pretrained("hf/d20-sft", trust_remote_code=True)
Writes the report line "Hugging Face export". The export itself is nanochat/hf_export.py.
"""

import argparse
import logging

from nanochat.checkpoint_manager import add_checkpoint_flags
from nanochat.common import add_debug_flag, autodetect_device_type, compute_cleanup, compute_init, script_main, setup_default_logging

log = logging.getLogger("nanochat.export_hf")


def build_parser():
    p = argparse.ArgumentParser(description="Export a nanochat checkpoint as a Hugging Face transformers folder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_flags(p, default="sft", source_help="checkpoint family to export")
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weight dtype in model.safetensors (float32 is exact; bfloat16 halves the size)")
    p.add_argument("--push-to-hub", default="", metavar="REPO", help="also upload the folder to this hub repo (empty = don't)")
    p.add_argument("--device-type", default="cpu", help="where to load the checkpoint: cpu|cuda|mps (empty = autodetect)")
    add_debug_flag(p)
    return p


@script_main("export_hf")
def main(argv=None):
    """Write the folder; returns its path."""
    setup_default_logging()
    args = build_parser().parse_args(argv)

    from nanochat.checkpoint_manager import load_model, resolve_checkpoint
    from nanochat.hf_export import export_folder, push_to_hub, require_export_extra
    from nanochat.report import get_report

    require_export_extra()
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    try:
        _, tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=tag, step=step)
        meta = {"source": args.source, "model_tag": tag, "step": step}
        out = export_folder(model, tokenizer, args.out, dtype=args.dtype, meta=meta)
        if args.push_to_hub:
            push_to_hub(out, args.push_to_hub)
        get_report().log(section="Hugging Face export",
                         data=[{"Exported": f"{args.source} {tag} step {step} -> {out} ({args.dtype})"
                                + (f", pushed to {args.push_to_hub}" if args.push_to_hub else "")}])
        return out
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
