"""
Compare the compression (bytes per token) of our tokenizer with GPT-2's and GPT-4's.

    python -m scripts.tok_eval              # fetches the GPT-2/GPT-4 vocabularies once if they aren't cached
    python -m scripts.tok_eval --offline    # never touch the network; compare what is available

Texts: the samples in nanochat/data/tok_eval_samples/ plus, when the pretraining shards exist, the
first document batch of the train and of the val split. Writes the report section "Tokenizer evaluation".
"""

import argparse
import logging
import sys

from nanochat.common import add_debug_flag, script_main, setup_default_logging
from nanochat.tokenizer import (EncodingUnavailableError, RustBPETokenizer, get_tokenizer,
                                load_tok_eval_samples, measure_compression)

log = logging.getLogger("nanochat.tok_eval")

BASELINES = [("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")]
GREEN, RED, RESET = "\033[92m", "\033[91m", "\033[0m"


def build_parser():
    p = argparse.ArgumentParser(description="Compression ratio of our tokenizer vs GPT-2 and GPT-4 (tiktoken).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--offline", action="store_true", help="use only tiktoken's local cache for GPT-2/GPT-4, never the network")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a GPT-2/GPT-4 vocabulary download")
    add_debug_flag(p)
    return p


def shard_texts():
    """[(name, text)] for the first doc batch of the train and val shards; [] (with a note) without shards."""
    from nanochat.dataset import list_parquet_files, parquets_iter_batched

    if len(list_parquet_files()) < 2:
        log.info("No pretraining shards found: skipping the climbmix-train/climbmix-val rows "
                 "(get shards with `python -m nanochat.dataset -n 8`)")
        return []
    texts = []
    for split in ("train", "val"):
        batch = next(iter(parquets_iter_batched(split)), [])
        text = "\n".join(batch)
        if text:
            texts.append((f"climbmix-{split}", text))
    return texts


def print_comparison(baseline_name, rows, use_color):
    """rows: [(name, bytes, baseline_tokens, baseline_ratio, our_tokens, our_ratio)]."""
    print(f"\nComparison with {baseline_name}:")
    print("=" * 95)
    print(f"{'Text Type':<14} {'Bytes':<8} {baseline_name:<15} {'Ours':<15} {'Relative':<12} {'Better':<10}")
    print(f"{'':<14} {'':<8} {'Tokens':<7} {'Ratio':<7} {'Tokens':<7} {'Ratio':<7} {'Diff %':<12}")
    print("-" * 95)
    for name, n_bytes, b_tok, b_ratio, o_tok, o_ratio in rows:
        diff = (b_tok - o_tok) / b_tok * 100 if b_tok else 0.0
        if o_ratio > b_ratio:
            better, b_color, o_color = "Ours", RED, GREEN
        elif o_ratio < b_ratio:
            better, b_color, o_color = baseline_name, GREEN, RED
        else:
            better, b_color, o_color = "Tie", "", ""
        if not use_color:
            b_color = o_color = ""
        b_end, o_end = RESET if b_color else "", RESET if o_color else ""
        print(f"{name:<14} {n_bytes:<8} {b_color}{b_tok:<7}{b_end} {b_color}{b_ratio:<7.2f}{b_end} "
              f"{o_color}{o_tok:<7}{o_end} {o_color}{o_ratio:<7.2f}{o_end} {diff:+7.1f}%     {better}")


def comparison_markdown(baseline_name, rows):
    lines = [f"### Comparison with {baseline_name}", "",
             f"| Text Type | Bytes | {baseline_name} Tokens | {baseline_name} Ratio | Ours Tokens | Ours Ratio | Relative Diff % |",
             "|-----------|-------|--------------|--------------|-------------|------------|-----------------|"]
    for name, n_bytes, b_tok, b_ratio, o_tok, o_ratio in rows:
        diff = (b_tok - o_tok) / b_tok * 100 if b_tok else 0.0
        lines.append(f"| {name} | {n_bytes} | {b_tok} | {b_ratio:.2f} | {o_tok} | {o_ratio:.2f} | {diff:+.1f}% |")
    return "\n".join(lines) + "\n\n"


def ours_markdown(vocab_size, ours):
    lines = [f"### Ours alone (vocab {vocab_size:,})", "", "| Text Type | Bytes | Ours Tokens | Ours Ratio |",
             "|-----------|-------|-------------|------------|"]
    lines += [f"| {name} | {n_bytes} | {tok} | {ratio:.2f} |" for name, (n_bytes, tok, ratio) in ours.items()]
    return "\n".join(lines) + "\n\n"


@script_main("tok_eval")
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    from nanochat.report import get_report

    tokenizer = get_tokenizer()
    texts = load_tok_eval_samples() + shard_texts()

    baselines, unavailable = {}, {}
    for label, name in BASELINES:
        try:
            baselines[label] = RustBPETokenizer.from_pretrained(name, offline=args.offline, timeout=args.timeout)
        except EncodingUnavailableError as e:
            unavailable[label] = f"{label} encoding unavailable offline ({e})"

    ours = {name: measure_compression(tokenizer, text, "our tokenizer") for name, text in texts}
    print("\nVocab sizes:")
    for label, _ in BASELINES:
        print(f"{label}: {baselines[label].get_vocab_size()}" if label in baselines else f"{label}: unavailable")
    print(f"Ours: {tokenizer.get_vocab_size()}")

    use_color = sys.stdout.isatty()
    report = []
    for label, _ in BASELINES:
        if label not in baselines:
            print(f"\n{unavailable[label]}")
            report.append(f"### Comparison with {label}\n\n{unavailable[label]}\n\n")
            continue
        rows = []
        for name, text in texts:
            _, b_tok, b_ratio = measure_compression(baselines[label], text, label)
            n_bytes, o_tok, o_ratio = ours[name]
            rows.append((name, n_bytes, b_tok, b_ratio, o_tok, o_ratio))
        print_comparison(label, rows, use_color)
        report.append(comparison_markdown(label, rows))
    if unavailable:
        print(f"\nOurs (vocab {tokenizer.get_vocab_size():,}):")
        print(f"{'Text Type':<16} {'Bytes':<10} {'Tokens':<8} {'Ratio':<7}")
        for name, (n_bytes, tok, ratio) in ours.items():
            print(f"{name:<16} {n_bytes:<10} {tok:<8} {ratio:<7.2f}")
        report.append(ours_markdown(tokenizer.get_vocab_size(), ours))

    get_report().log(section="Tokenizer evaluation", data=["".join(report)])
    return ours


if __name__ == "__main__":
    main()
