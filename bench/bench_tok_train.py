"""
Tokenizer training speed: our rustbpe versus PyPI rustbpe 0.1.0 and HuggingFace `tokenizers`.

    python bench/bench_tok_train.py                         # 20M chars, vocab 32,768, all three
    python bench/bench_tok_train.py --chars 5000000 --vocab-size 8192 --contenders ours,pypi
    python bench/bench_tok_train.py --ref-python /path/to/python   # a Python with rustbpe==0.1.0 + tokenizers

The text is real and offline: nanochat's offline corpus (the standard library and installed packages'
docs, see nanochat/offline_corpus.py), cut into documents of at most --doc-cap characters as
scripts/tok_train.py does. Each contender trains in its own subprocess on the same documents with the
same split pattern; the subprocess times only the training call and reports its peak RSS. We report
wall time, peak memory, speedups, and whether our merges equal PyPI rustbpe's (they must: same
algorithm, same tie-break) and how much of HF's vocabulary (which breaks ties differently) is shared.

PyPI rustbpe has our module's name, so the two references live in a separate venv, bench/.venv-ref,
created on first use with `uv venv` + `uv pip install rustbpe==0.1.0 tokenizers` (needs network once).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_VENV = os.path.join(ROOT, "bench", ".venv-ref")
CONTENDERS = ("ours", "pypi", "hf")
LABELS = {"ours": "rustbpe (ours)", "pypi": "rustbpe 0.1.0 (PyPI)", "hf": "HF tokenizers BpeTrainer"}

# nanochat's split pattern, what scripts/tok_train.py trains with; --pattern gpt4 uses \p{N}{1,3}.
PATTERNS = {
    "nanochat": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}


def build_parser():
    p = argparse.ArgumentParser(description="Tokenizer training: ours vs PyPI rustbpe 0.1.0 vs HF tokenizers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--chars", type=int, default=20_000_000, help="characters of training text")
    p.add_argument("--doc-cap", type=int, default=10_000, help="cut documents into pieces of at most this many characters")
    p.add_argument("--vocab-size", type=int, default=32_768, help="vocabulary size every contender trains to")
    p.add_argument("--pattern", choices=sorted(PATTERNS), default="nanochat", help="split pattern for all contenders")
    p.add_argument("--contenders", type=str, default=",".join(CONTENDERS), help=f"comma list from {CONTENDERS}")
    p.add_argument("--repeats", type=int, default=1, help="runs per contender; the fastest counts (noisy machines)")
    p.add_argument("--ref-python", type=str, default="", help="Python with rustbpe==0.1.0 and tokenizers ('' = bench/.venv-ref, created on demand)")
    p.add_argument("--json", type=str, default="", help="also write the results to this JSON file")
    # Internal: one training run in a subprocess.
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=str, help=argparse.SUPPRESS)
    p.add_argument("--out", type=str, help=argparse.SUPPRESS)
    return p


# -----------------------------------------------------------------------------
# Text

def load_documents(max_chars, doc_cap):
    """Real offline text: at least `max_chars` characters in documents of at most `doc_cap` characters.

    The one place that decides what the benchmark trains on; swap it to use another corpus.
    """
    sys.path.insert(0, ROOT)
    from nanochat.offline_corpus import iter_offline_documents, split_long_document

    docs, total = [], 0
    for doc in iter_offline_documents():
        for piece in split_long_document(doc, doc_cap):
            docs.append(piece)
            total += len(piece)
            if total >= max_chars:
                return docs
    raise SystemExit(f"The offline corpus has only {total:,} characters here, fewer than --chars {max_chars:,}; "
                     "lower --chars or install more packages with docs.")


# -----------------------------------------------------------------------------
# Worker: runs inside the subprocess, imports only the library under test

def _proc_status_kib(field):
    """A memory figure of this process from /proc/self/status (Linux), in KiB.

    VmHWM (peak RSS) rather than getrusage's ru_maxrss: the latter survives exec, so a worker would
    report at least its parent's RSS at fork time.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _bytes_to_unicode():
    """GPT-2's byte -> printable char table, which HF's ByteLevel pre-tokenizer uses for its vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _train_rustbpe(docs, vocab_size, pattern):
    import rustbpe

    tok = rustbpe.Tokenizer()
    t0 = time.perf_counter()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
    seconds = time.perf_counter() - t0
    tokens = [bytes(b).hex() for b, _ in tok.get_mergeable_ranks()]
    return seconds, tokens, os.path.dirname(rustbpe.__file__)


def _train_hf(docs, vocab_size, pattern):
    # The configuration of nanochat's HF reference tokenizer.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    t0 = time.perf_counter()
    tok.train_from_iterator(docs, trainer)
    seconds = time.perf_counter() - t0
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [bytes(inverse[c] for c in token).hex() for token, _ in vocab]
    import tokenizers
    return seconds, tokens, os.path.dirname(tokenizers.__file__)


def run_worker(args):
    with open(args.corpus, encoding="utf-8") as f:
        docs = json.load(f)
    rss_before = _proc_status_kib("VmRSS")
    try:
        # Reset the peak-RSS mark so that it measures training, not the JSON parsing of the corpus.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        print(f"warning: could not reset the peak-RSS mark ({e}); peak RSS includes loading the corpus", file=sys.stderr)
    train = _train_hf if args.worker == "hf" else _train_rustbpe
    seconds, tokens, location = train(docs, args.vocab_size, PATTERNS[args.pattern])
    peak = _proc_status_kib("VmHWM")
    with open(args.out, "w") as f:
        json.dump({"seconds": seconds, "peak_rss_kib": peak, "rss_before_kib": rss_before, "tokens": tokens,
                   "module": location}, f)


# -----------------------------------------------------------------------------
# Driver

def ensure_ref_python(ref_python):
    """A Python that can import PyPI rustbpe 0.1.0 and tokenizers; builds bench/.venv-ref if needed."""
    if ref_python:
        return ref_python
    python = os.path.join(REF_VENV, "bin", "python")
    probe = [python, "-c", "import importlib.metadata as m; assert m.version('rustbpe') == '0.1.0'; import tokenizers"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"Creating the reference venv {REF_VENV} (rustbpe==0.1.0, tokenizers)...", flush=True)
    try:
        subprocess.run(["uv", "venv", "--python", sys.executable, REF_VENV], check=True)
        subprocess.run(["uv", "pip", "install", "--python", python, "rustbpe==0.1.0", "tokenizers"], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"Could not build {REF_VENV} ({e}). Install rustbpe==0.1.0 and tokenizers into some Python "
                         "and pass it as --ref-python, or run with --contenders ours.") from e
    return python


def run_contender(name, python, corpus_path, args, workdir):
    out = os.path.join(workdir, f"{name}.json")
    cmd = [python, os.path.abspath(__file__), "--worker", name, "--corpus", corpus_path, "--out", out,
           "--vocab-size", str(args.vocab_size), "--pattern", args.pattern]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{LABELS[name]} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    result["process_seconds"] = time.perf_counter() - t0
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown or not contenders:
        raise SystemExit(f"--contenders: unknown {unknown}; choose from {CONTENDERS}")
    pythons = {"ours": sys.executable}
    if set(contenders) & {"pypi", "hf"}:
        ref = ensure_ref_python(args.ref_python)
        pythons.update(pypi=ref, hf=ref)

    t0 = time.perf_counter()
    docs = load_documents(args.chars, args.doc_cap)
    n_chars = sum(map(len, docs))
    print(f"Corpus: {len(docs):,} documents, {n_chars:,} characters ({time.perf_counter() - t0:.1f}s to build); "
          f"vocab_size {args.vocab_size:,}; pattern {args.pattern}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        corpus_path = os.path.join(workdir, "corpus.json")
        with open(corpus_path, "w", encoding="utf-8") as f:
            json.dump(docs, f, ensure_ascii=False)
        del docs
        for rep in range(args.repeats):
            for name in contenders:  # interleaved, so slow phases of a noisy machine hit everyone
                r = run_contender(name, pythons[name], corpus_path, args, workdir)
                print(f"  [{rep + 1}/{args.repeats}] {LABELS[name]:<26} {r['seconds']:8.2f} s   "
                      f"peak RSS {r['peak_rss_kib'] / 1024:7.0f} MiB   ({r['module']})", flush=True)
                if name not in results or r["seconds"] < results[name]["seconds"]:
                    results[name] = r

    print("\n| contender | train time (s) | peak RSS (MiB) | RSS added by training (MiB) | vocab |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {LABELS[name]} | {r['seconds']:.2f} | {r['peak_rss_kib'] / 1024:.0f} | "
              f"{(r['peak_rss_kib'] - r['rss_before_kib']) / 1024:.0f} | {len(r['tokens']):,} |")
    summary = {"chars": n_chars, "vocab_size": args.vocab_size, "pattern": args.pattern,
               "seconds": {k: r["seconds"] for k, r in results.items()},
               "peak_rss_mib": {k: r["peak_rss_kib"] / 1024 for k, r in results.items()}}
    if "ours" in results:
        print()
        for ref in ("pypi", "hf"):
            if ref in results:
                speedup = results[ref]["seconds"] / results["ours"]["seconds"]
                summary[f"speedup_vs_{ref}"] = speedup
                print(f"Speedup of ours over {LABELS[ref]}: {speedup:.2f}x")
        if "pypi" in results:
            same = results["ours"]["tokens"] == results["pypi"]["tokens"]
            summary["merges_equal_pypi"] = same
            print(f"Merges identical to PyPI rustbpe 0.1.0: {same}")
        if "hf" in results:
            hf_tokens = results["hf"]["tokens"]
            shared = len(set(results["ours"]["tokens"]) & set(hf_tokens))
            summary["hf_vocab_shared"] = shared / len(hf_tokens)
            print(f"HF tokens also in our vocabulary (HF breaks ties differently): {shared:,} of {len(hf_tokens):,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
