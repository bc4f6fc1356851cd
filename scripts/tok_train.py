"""
Train the BPE tokenizer on the pretraining shards.

    python -m nanochat.dataset -n 8              # the shards first (or: python -m nanochat.dataset ingest ...)
    python -m scripts.tok_train                  # 2B characters, 32,768 tokens
    python -m scripts.tok_train --max-chars=20000000 --vocab-size=4096   # a quick small one

Writes <base>/tokenizer/tokenizer.pkl and <base>/tokenizer/token_bytes.pt, and the report section
"Tokenizer training".
"""

import argparse
import logging
import os
import time

from nanochat.common import add_debug_flag, atomic_torch_save, get_base_dir, script_main, setup_default_logging
from nanochat.tokenizer import SPECIAL_TOKENS, CappedTexts, RustBPETokenizer, compute_token_bytes, token_bytes_summary

log = logging.getLogger("nanochat.tok_train")

# Exercises digits (split in pairs), contractions, punctuation runs and multi-byte characters.
SANITY_TEXT = "\n".join([
    "Hello world! This is a test.",
    "Numbers: 123, 4567, 89",
    "Contractions: I'm, you're, it's",
    "Special chars: @#$%^&*()",
    "Unicode: 你好世界 🌍",
])


def build_parser():
    p = argparse.ArgumentParser(description="Train a BPE tokenizer (rustbpe) on the train split of the pretraining shards.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters of text (2B)")
    p.add_argument("--doc-cap", type=int, default=10_000, help="crop every document to its first N characters")
    p.add_argument("--vocab-size", type=int, default=32_768, help="vocabulary size including the 9 special tokens (2^15)")
    add_debug_flag(p)
    return p


@script_main("tok_train")
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_default_logging()
    if args.max_chars < 1 or args.doc_cap < 1:
        parser.error("--max-chars and --doc-cap must be positive")
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if args.vocab_size < min_vocab:
        parser.error(f"--vocab-size must be at least {min_vocab} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    log.info("max_chars: %s, doc_cap: %s, vocab_size: %s", f"{args.max_chars:,}", f"{args.doc_cap:,}", f"{args.vocab_size:,}")

    from tqdm import tqdm

    from nanochat.dataset import DatasetError, list_parquet_files, parquets_iter_batched
    from nanochat.report import get_report

    if len(list_parquet_files(warn_on_legacy=True)) < 2:
        raise DatasetError("tok_train needs pretraining shards: at least one train shard plus the validation shard "
                         "(the last file). Download them with `python -m nanochat.dataset -n 8`, build them without network "
                         "with `python -m nanochat.dataset offline`, or turn your own text into shards with "
                         "`python -m nanochat.dataset ingest <files or dirs>`.")

    with tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="tokenizer text", mininterval=1.0) as bar:
        texts = CappedTexts(parquets_iter_batched("train"), args.max_chars, args.doc_cap, progress=bar)
        t0 = time.time()
        tokenizer = RustBPETokenizer.train_from_iterator(texts, args.vocab_size)
        train_time = time.time() - t0
    if texts.chars == 0:
        raise DatasetError("the train shards hold no text; re-create them with `python -m nanochat.dataset -n 8` "
                         "or `python -m nanochat.dataset ingest ...`")
    log.info("Trained on %s characters from %s documents in %.2fs; vocab size %s",
             f"{texts.chars:,}", f"{texts.docs:,}", train_time, f"{tokenizer.get_vocab_size():,}")

    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    tokenizer.save(tokenizer_dir)
    if tokenizer.decode(tokenizer.encode(SANITY_TEXT)) != SANITY_TEXT:
        raise RuntimeError("the trained tokenizer does not reproduce the sanity text on encode/decode")

    token_bytes = compute_token_bytes(tokenizer)
    token_bytes_path = os.path.join(tokenizer_dir, "token_bytes.pt")
    atomic_torch_save(token_bytes, token_bytes_path)
    log.info("Saved token_bytes to %s", token_bytes_path)
    stats = token_bytes_summary(token_bytes)
    log.info("token bytes: min %d, max %d, mean %.4f, std %.4f", stats["token_bytes_min"], stats["token_bytes_max"],
             stats["token_bytes_mean"], stats["token_bytes_std"])

    get_report().log(section="Tokenizer training", data=[
        vars(args),
        {"train_time": train_time, "num_special_tokens": len(tokenizer.get_special_tokens()), **stats},
    ])
    return tokenizer


if __name__ == "__main__":
    main()
