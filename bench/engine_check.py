"""
Self-check of the Engine's KV-cached decoding against the model's cache-free sampler (GPT.generate, which
recomputes the whole sequence every step): greedy tokens both ways, their times, and whether they match.

    python -m bench.engine_check -i base            # greedy 64 tokens both ways; exit 1 on a mismatch

Tests: python -m pytest tests/test_engine.py -q -k reference
"""

import argparse
import logging
import time

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_init, setup_default_logging
from nanochat.engine import Engine, model_device

logger = logging.getLogger("nanochat")


def compare_with_reference(model, prompt_tokens, max_tokens=64):
    """{"reference": ids, "engine": ids, "reference_seconds", "engine_seconds", "match": bool}, greedy both ways."""
    def timed(fn):
        if model_device(model).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if model_device(model).type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    reference, ref_s = timed(lambda: list(model.generate(prompt_tokens, max_tokens, temperature=0)))
    # The naive sampler knows no stop tokens or tools, so compare raw streams: an Engine without tokenizer.
    engine = Engine(model, None)
    (rows, _), eng_s = timed(lambda: engine.generate_batch(prompt_tokens, max_tokens=max_tokens, temperature=0))
    generated = rows[0][len(prompt_tokens):]
    return {"reference": reference, "engine": generated, "reference_seconds": ref_s, "engine_seconds": eng_s,
            "match": reference == generated}


def build_parser():
    p = argparse.ArgumentParser(description="Check KV-cached generation against cache-free recomputation (greedy).")
    p.add_argument("-i", "--source", default="base", choices=("base", "mid", "sft", "rl"), help="checkpoint family to load")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint directory tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("-p", "--prompt", default="The chemical formula of water is", help="text to continue")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens to generate with each path")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    return p


def main(argv=None):
    setup_default_logging()
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise SystemExit(f"--max-tokens must be >= 1, got {args.max_tokens}")
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    prompt = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())
    result = compare_with_reference(model, prompt, args.max_tokens)
    logger.info("reference: %.3f s | %s", result["reference_seconds"], tokenizer.decode(result["reference"]))
    logger.info("engine:    %.3f s | %s", result["engine_seconds"], tokenizer.decode(result["engine"]))
    logger.info("match: %s", result["match"])
    return 0 if result["match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
