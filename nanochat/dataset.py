"""
The pretraining corpus as parquet shards `shard_00000.parquet`, ...: one `text` column (a document per row),
zstd, row groups of 1024 documents. Files sort by name; the LAST one is the validation split, the others
are training data. Three ways to get shards, all in this format:

    python -m nanochat.dataset -n 8                  # ClimbMix: train shards 0..7 + the val shard 6542
    python -m nanochat.dataset download -n 8 -w 4    # the same, spelled out (-n -1 = all 6542)
    python -m nanochat.dataset download -n 8 --offline-fallback   # no network? build the offline corpus
    python -m nanochat.dataset ingest my_texts/ notes.jsonl more.parquet [--txt-split paragraph]
    python -m nanochat.dataset offline               # no network: real text that ships with Python

Shards land in $NANOCHAT_BASE_DIR/base_data_climbmix unless --data-dir/--out-dir says otherwise; --base-url or
$NANOCHAT_DATA_URL points the download at a mirror. Input formats: nanochat/offline_corpus.py. Tests: tests/test_dataset.py.
"""

import argparse
import concurrent.futures
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time

from nanochat.common import UserError, atomic_write, get_base_dir, setup_default_logging

log = logging.getLogger("nanochat.dataset")

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # shards 0..6542; the last one is the pinned validation shard
DATA_DIR_NAME = "base_data_climbmix"
LEGACY_DATA_DIR_NAME = "base_data"  # FineWeb-Edu shards from before the ClimbMix switch
ROW_GROUP_SIZE = 1024  # documents per row group; DDP ranks split a file by row groups when it has enough of them
VAL_MIN_ROW_GROUPS = 8  # in a written val shard of >= 8 documents: one 8-GPU node's ranks each read whole groups
MANIFEST_NAME = "manifest.json"
DEFAULT_OFFLINE_CHARS = 45_000_000  # >= 20M for the tokenizer benchmark plus a tiny CPU training run
SUBCOMMANDS = ("download", "ingest", "offline")
OFFLINE_DOC_CHARS = 4000  # offline documents are cut to at most this many characters


class DatasetError(UserError, RuntimeError):
    """A problem the user can fix (missing shards, bad input, a data dir holding something else)."""


class DatasetHostUnreachable(DatasetError):
    """The dataset host did not answer at all (DNS failure, refused connection, timeout)."""

    def __init__(self, host, reason):
        self.host, self.reason = host, reason
        super().__init__(f"cannot reach the dataset host {host} ({reason}). Without network access, build shards from "
                         f"the offline corpus (`python -m nanochat.dataset offline`, or add --offline-fallback) or "
                         f"from your own text (`python -m nanochat.dataset ingest PATH`)")


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def get_data_dir():
    """Where the pretraining shards live: <base>/base_data_climbmix (not created here)."""
    return os.path.join(get_base_dir(), DATA_DIR_NAME)


def get_base_url(base_url=None):
    """The shard URL prefix: the argument, else $NANOCHAT_DATA_URL, else the ClimbMix repo on the hub."""
    return (base_url or os.environ.get("NANOCHAT_DATA_URL") or BASE_URL).rstrip("/")


def read_manifest(data_dir):
    """The manifest.json of an ingested/offline shard set, or None (ClimbMix downloads have none)."""
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def training_data_dir(warn_on_legacy=False):
    """The ClimbMix dir, or the legacy FineWeb-Edu dir when only that one exists."""
    data_dir, legacy = get_data_dir(), os.path.join(get_base_dir(), LEGACY_DATA_DIR_NAME)
    if os.path.isdir(data_dir) or not os.path.isdir(legacy):
        return data_dir
    if warn_on_legacy:
        log.warning("No ClimbMix shards in %s; using the legacy FineWeb-Edu shards in %s. "
                    "Upgrade with `python -m nanochat.dataset -n 170` and retrain the tokenizer "
                    "(`python -m scripts.tok_train`).", data_dir, legacy)
    return legacy


def list_parquet_files(data_dir=None, warn_on_legacy=False):
    """Sorted full paths of the *.parquet shards in `data_dir` (default: training_data_dir())."""
    data_dir = training_data_dir(warn_on_legacy) if data_dir is None else data_dir
    if not os.path.isdir(data_dir):
        return []
    # A leading dot marks the temp file of an interrupted write.
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet") and not n.startswith("."))
    return [os.path.join(data_dir, n) for n in names]


def split_files(split, data_dir=None, warn_on_legacy=False):
    """The shards of `split`: train = every shard but the last, val = the last; raises DatasetError with
    fewer than two shards (train and val documents must never overlap)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = list_parquet_files(data_dir, warn_on_legacy=warn_on_legacy)
    where = data_dir or get_data_dir()
    how = ("get shards with `python -m nanochat.dataset -n 8` (download), `python -m nanochat.dataset offline` "
           "(no network) or `python -m nanochat.dataset ingest PATH` (your own text)")
    if not files:
        raise DatasetError(f"no pretraining shards (*.parquet) in {where}; {how}")
    if len(files) == 1:
        raise DatasetError(f"only one shard in {where} ({os.path.basename(files[0])}), and the last shard is the "
                           f"validation split, so there is no training data; {how}")
    return files[:-1] if split == "train" else files[-1:]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """The `text` lists of row groups start, start+step, ... of every file of the split (rank, world_size interleave)."""
    import pyarrow.parquet as pq

    if start < 0 or step < 1:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start}, step={step}")
    for path in split_files(split, data_dir):
        pf = pq.ParquetFile(path)
        for rg in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def validate_shard(path):
    """Raise ValueError unless `path` is a parquet file with a `text` column. Returns its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ValueError(f"not a readable parquet file ({type(e).__name__}: {e})") from e
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    return pf.metadata.num_rows


def _describe_error(e):  # a one-line reason for a failed request
    import requests

    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code}"
    if isinstance(e, requests.Timeout):
        return "timed out"
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if m:
        return m.group(0).strip()
    if "NameResolution" in text or "getaddrinfo" in text:
        return "name resolution failed"
    return f"{type(e).__name__}: {text}".replace("\n", " ")[:200]


def probe_host(url, timeout=10):
    """Raise DatasetHostUnreachable if nothing answers at `url`'s host. Any HTTP status counts as an answer."""
    import requests
    from urllib.parse import urlsplit

    try:
        requests.head(url, timeout=timeout, allow_redirects=False).close()
    except (requests.ConnectionError, requests.Timeout) as e:
        raise DatasetHostUnreachable(urlsplit(url).netloc or url, _describe_error(e)) from None


def download_single_file(index, data_dir=None, base_url=None, max_attempts=5, retry_sleep=2.0, timeout=30):
    """Download shard `index` into `data_dir`; True on success (or already present and valid), else False. Up to
    `max_attempts` tries, retry_sleep * 2^(attempt-1) s apart; client errors other than 408/429 are final."""
    import requests

    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    filename = shard_filename(index)
    path = os.path.join(data_dir, filename)
    if os.path.exists(path):
        try:
            validate_shard(path)
            return True
        except ValueError as e:
            log.warning("%s exists but is damaged (%s); downloading it again", filename, e)
            os.remove(path)
    url = f"{get_base_url(base_url)}/{filename}"
    for attempt in range(1, max_attempts + 1):
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{filename}.", suffix=".tmp")
        permanent = False
        try:
            with os.fdopen(fd, "wb") as f, requests.get(url, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            validate_shard(tmp)  # renamed into place only once valid: a garbage download never looks like a shard
            os.replace(tmp, path)
            return True
        except (requests.RequestException, OSError, ValueError) as e:
            reason = _describe_error(e)
            status = e.response.status_code if isinstance(e, requests.HTTPError) and e.response is not None else None
            permanent = status is not None and 400 <= status < 500 and status not in (408, 429)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if permanent or attempt == max_attempts:
            log.error("Giving up on %s after %d attempt(s): %s", filename, attempt, reason)
            return False
        wait = retry_sleep * 2 ** (attempt - 1)
        log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", filename, attempt, max_attempts, reason, wait)
        time.sleep(wait)
    return False  # only reached with max_attempts < 1


def download_shards(num_files=-1, num_workers=4, data_dir=None, base_url=None, progress=True, **kwargs):
    """Download train shards 0..num_files-1 (-1 = all) plus the val shard; returns the indices that failed. Raises
    DatasetHostUnreachable, before any download, when the host does not answer. kwargs: download_single_file's."""
    from tqdm import tqdm

    if num_files < -1:
        raise DatasetError(f"-n/--num-files must be -1 (all) or >= 0, got {num_files}")
    if num_workers < 1:
        raise DatasetError(f"-w/--num-workers must be >= 1, got {num_workers}")
    if kwargs.get("max_attempts", 1) < 1:
        raise DatasetError(f"--max-attempts must be >= 1, got {kwargs['max_attempts']}")
    data_dir = data_dir or get_data_dir()
    manifest = read_manifest(data_dir)
    if manifest is not None and manifest.get("source") != "climbmix":
        raise DatasetError(f"{data_dir} holds the {manifest.get('source')!r} corpus (see its {MANIFEST_NAME}); "
                           f"mixing ClimbMix shards into it would break the train/val split. Move it away "
                           f"(e.g. `mv {data_dir} {data_dir}.{manifest.get('source')}`) or pass --data-dir")
    n = MAX_SHARD if num_files == -1 else min(num_files, MAX_SHARD)
    ids = list(range(n)) + [MAX_SHARD]
    missing = [i for i in ids if not os.path.exists(os.path.join(data_dir, shard_filename(i)))]
    log.info("Shards: %d requested, %d to download into %s with %d workers", len(ids), len(missing), data_dir, num_workers)
    if missing:
        probe_host(f"{get_base_url(base_url)}/{shard_filename(missing[0])}")
    os.makedirs(data_dir, exist_ok=True)
    failed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool, \
            tqdm(total=len(ids), unit="shard", desc="shards", disable=not progress) as bar:
        # Threads, not processes: the work is network and disk I/O, which releases the GIL.
        futures = {pool.submit(download_single_file, i, data_dir, base_url, **kwargs): i for i in ids}
        for fut in concurrent.futures.as_completed(futures):
            if not fut.result():
                failed.append(futures[fut])
            bar.update(1)
    log.info("Done! Downloaded: %d/%d", len(ids) - len(failed), len(ids))
    return sorted(failed)


class ShardSetWriter:
    """Stream documents into train shards plus one val shard (sorting last), in a staging dir, then move them in.
    A train shard closes at a row-group boundary once it holds >= shard_chars characters."""

    def __init__(self, out_dir, shard_chars, overwrite=False):
        import pyarrow as pa

        if shard_chars < 1:
            raise DatasetError(f"--shard-chars must be >= 1, got {shard_chars}")
        self.out_dir, self.shard_chars, self.overwrite = out_dir, shard_chars, overwrite
        self._check_out_dir()
        os.makedirs(out_dir, exist_ok=True)
        stale = [e.path for e in os.scandir(out_dir) if e.is_dir() and e.name.startswith(".staging-")]
        for path in stale:  # an ingest killed midway (a finished or failed one removes its own)
            shutil.rmtree(path, ignore_errors=True)
        if stale:
            log.info("Removed %d staging dir(s) left by an interrupted ingest in %s", len(stale), out_dir)
        self.staging = tempfile.mkdtemp(dir=out_dir, prefix=".staging-")
        self.schema = pa.schema([("text", pa.string())])
        self.train = {"writer": None, "buf": [], "chars": 0}
        self.val = {"writer": None, "buf": [], "chars": 0}
        self.train_shards = 0
        self.stats = {"train_docs": 0, "train_chars": 0, "val_docs": 0, "val_chars": 0}

    def _check_out_dir(self):
        existing = list_parquet_files(self.out_dir)
        if existing and not self.overwrite:
            manifest = read_manifest(self.out_dir)
            source = manifest.get("source") if manifest else "climbmix download"
            raise DatasetError(f"{self.out_dir} already holds {len(existing)} shard(s) ({source}); pass --overwrite "
                               f"to replace them, or --out-dir to write somewhere else")

    def _staged(self, name):
        return os.path.join(self.staging, name)

    def _flush(self, part, name, groups=1):  # the buffered documents as `groups` near-equal row groups
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = part["buf"]
        if not buf:
            return
        if part["writer"] is None:
            part["writer"] = pq.ParquetWriter(self._staged(name), self.schema, compression="zstd", compression_level=3,
                                              use_dictionary=False, write_statistics=False)
        size, extra = divmod(len(buf), groups)
        start = 0
        for g in range(groups):  # one write_table per group: each call ends its own row group
            stop = start + size + (g < extra)
            part["writer"].write_table(pa.table({"text": buf[start:stop]}, schema=self.schema),
                                       row_group_size=ROW_GROUP_SIZE)
            start = stop
        part["buf"] = []

    def add(self, text, to_val=False):
        part, name = (self.val, "val.parquet") if to_val else (self.train, shard_filename(self.train_shards))
        # One row group in memory, or the val shard's first eight: a val shard of n <= 8192 documents (1-2% of
        # them) is then written as min(n, 8) row groups, and up to 8 ranks each read whole groups.
        held = ROW_GROUP_SIZE * (VAL_MIN_ROW_GROUPS if to_val and part["writer"] is None else 1)
        # Flush before adding: the last train document stays in memory, for finish() to move to an empty val.
        if len(part["buf"]) == held:
            self._flush(part, name, groups=len(part["buf"]) // ROW_GROUP_SIZE)
        if not to_val and part["writer"] is not None and not part["buf"] and part["chars"] >= self.shard_chars:
            part["writer"].close()
            part["writer"], part["chars"] = None, 0
            self.train_shards += 1
        part["buf"].append(text)
        part["chars"] += len(text)
        kind = "val" if to_val else "train"
        self.stats[f"{kind}_docs"] += 1
        self.stats[f"{kind}_chars"] += len(text)

    def finish(self, manifest):
        """Close the shards, move them into out_dir (replacing old ones), write the manifest; returns it."""
        if self.stats["val_docs"] == 0 and self.train["buf"]:
            text = self.train["buf"].pop()
            self.train["chars"] -= len(text)
            self.stats["train_docs"] -= 1
            self.stats["train_chars"] -= len(text)
            self.add(text, to_val=True)
        if self.stats["train_docs"] == 0 or self.stats["val_docs"] == 0:
            raise DatasetError(f"need at least 2 non-empty documents (1 train + 1 val), got "
                               f"{self.stats['train_docs'] + self.stats['val_docs']}; check the input paths and options")
        self._flush(self.train, shard_filename(self.train_shards))
        if self.train["writer"] is not None:  # None when moving a document to val emptied a fresh shard
            self.train["writer"].close()
            self.train_shards += 1
        all_held = self.val["writer"] is None  # n <= 8192: min(n, 8) near-equal row groups
        self._flush(self.val, "val.parquet", groups=min(len(self.val["buf"]), VAL_MIN_ROW_GROUPS) if all_held else 1)
        self.val["writer"].close()
        os.replace(self._staged("val.parquet"), self._staged(shard_filename(self.train_shards)))
        self._check_out_dir()  # again: something may have appeared while we were writing
        if os.path.exists(os.path.join(self.out_dir, MANIFEST_NAME)):
            os.remove(os.path.join(self.out_dir, MANIFEST_NAME))  # first, so a crash never labels old shards as new
        for old in list_parquet_files(self.out_dir):
            os.remove(old)
        num_shards = self.train_shards + 1
        for i in range(num_shards):
            os.replace(self._staged(shard_filename(i)), os.path.join(self.out_dir, shard_filename(i)))
        manifest = {**manifest, "num_shards": num_shards, **self.stats, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(os.path.join(self.out_dir, MANIFEST_NAME), json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(self.staging)
        return manifest

    def abort(self):
        for part in (self.train, self.val):
            if part["writer"] is not None:
                part["writer"].close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _val_picker(val_fraction=None, val_docs=None):  # i -> whether document i of the stream goes to val
    if val_docs is not None:
        if val_docs < 1:
            raise DatasetError(f"--val-docs must be >= 1, got {val_docs}")
        return lambda i: i < val_docs
    if not 0 < val_fraction <= 0.5:
        raise DatasetError(f"--val-fraction must be in (0, 0.5], got {val_fraction}")
    # Document i goes to val when floor((i+1)f) > floor(i f): exactly floor(n f) val documents, evenly spread.
    return lambda i: int((i + 1) * val_fraction) > int(i * val_fraction)


def write_shards(documents, out_dir, manifest, shard_chars, val_fraction=0.01, val_docs=None, overwrite=False):
    """Write an iterable of document strings as a complete shard set in `out_dir`; returns the manifest."""
    is_val = _val_picker(val_fraction, val_docs)
    writer = ShardSetWriter(out_dir, shard_chars, overwrite)
    try:
        for i, text in enumerate(documents):
            writer.add(text, to_val=is_val(i))
        manifest = writer.finish(manifest)
    except BaseException:
        writer.abort()
        raise
    log.info("Wrote %d train + %d val documents (%s chars) of the %s corpus into %d shards in %s",
             manifest["train_docs"], manifest["val_docs"], f"{manifest['train_chars'] + manifest['val_chars']:,}",
             manifest["source"], manifest["num_shards"], out_dir)
    return manifest


def ingest(paths, out_dir=None, text_field="text", txt_split="file", val_fraction=0.01, val_docs=None,
           shard_chars=250_000_000, max_doc_chars=0, overwrite=False):
    """Turn the user's .txt/.md/.jsonl/.parquet files (or directories of them) into a shard set."""
    from nanochat.offline_corpus import iter_input_documents

    out_dir = out_dir or get_data_dir()
    docs = iter_input_documents(paths, text_field=text_field, txt_split=txt_split, max_doc_chars=max_doc_chars)
    manifest = {"source": "ingest", "inputs": [os.path.abspath(p) for p in paths], "text_field": text_field,
                "txt_split": txt_split, "max_doc_chars": max_doc_chars}
    return write_shards(docs, out_dir, manifest, shard_chars, val_fraction, val_docs, overwrite)


def build_offline_corpus(out_dir=None, max_chars=None, shard_chars=8_000_000, val_fraction=0.02, overwrite=False):
    """Build shards from text that ships with this Python (max_chars None = DEFAULT_OFFLINE_CHARS); returns the manifest."""
    import platform

    from nanochat import offline_corpus

    out_dir = out_dir or get_data_dir()
    max_chars = DEFAULT_OFFLINE_CHARS if max_chars is None else max_chars
    log.info("Building the offline corpus (up to %s chars) from Python %s's standard library in %s and the installed "
             "packages in %s; its content depends on the installed Python and packages", f"{max_chars:,}",
             platform.python_version(), offline_corpus.stdlib_dir(), ", ".join(offline_corpus.site_packages_dirs()))
    # Source files average ~11k characters: the packing loader would see only each file's first row of them.
    docs = [piece for doc in offline_corpus.iter_offline_documents(max_chars)
            for piece in offline_corpus.split_long_document(doc, OFFLINE_DOC_CHARS)]
    random.Random(42).shuffle(docs)  # the val shard samples everything, not the last package
    manifest = {"source": "offline", "python": platform.python_version(), "stdlib": offline_corpus.stdlib_dir(),
                "site_packages": offline_corpus.site_packages_dirs(), "max_chars": max_chars, "max_doc_chars": OFFLINE_DOC_CHARS, "seed": 42}
    return write_shards(docs, out_dir, manifest, shard_chars, val_fraction=val_fraction, overwrite=overwrite)


def ensure_pretraining_data(num_files, data_dir=None, base_url=None, num_workers=4, **download_kwargs):
    """Make sure there are shards to train on; returns their source: an ingest/offline set already there, else
    climbmix (downloaded), else offline when the host can't be reached. Raises DatasetError if downloads fail."""
    data_dir = data_dir or get_data_dir()
    manifest = read_manifest(data_dir)
    if manifest is not None and manifest.get("source") != "climbmix" and list_parquet_files(data_dir):
        log.info("Using the %s corpus already in %s (%d shards)", manifest["source"], data_dir, manifest["num_shards"])
        return manifest["source"]
    try:
        failed = download_shards(num_files, num_workers, data_dir, base_url, **download_kwargs)
    except DatasetHostUnreachable as e:
        partial = list_parquet_files(data_dir)
        if partial:
            raise DatasetError(f"cannot reach the dataset host {e.host} ({e.reason}), and not falling back to the offline "
                               f"corpus: {data_dir} already holds {len(partial)} ClimbMix shard(s) it would be mixed "
                               f"with; move them away or retry with network") from None
        log.warning("Falling back to the offline corpus: cannot reach the dataset host %s (%s)", e.host, e.reason)
        build_offline_corpus(data_dir)
        return "offline"
    if failed:
        raise DatasetError(f"{len(failed)} shard(s) failed to download: {', '.join(map(shard_filename, failed[:10]))}"
                           f"{' ...' if len(failed) > 10 else ''}; rerun the same command to retry them")
    return "climbmix"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m nanochat.dataset",
                                description="Get pretraining shards: download ClimbMix (default), ingest your own text, "
                                            "or build the offline corpus. `-n N` alone means `download -n N`.")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    d = sub.add_parser("download", help="download ClimbMix shards", formatter_class=fmt)
    d.add_argument("-n", "--num-files", type=int, default=-1, help="number of train shards (-1 = all 6542); the val shard is always added")
    d.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    d.add_argument("--data-dir", default=None, help="where to put the shards (default: <base>/base_data_climbmix)")
    d.add_argument("--base-url", default=None, help=f"URL prefix of the shards (default: $NANOCHAT_DATA_URL or {BASE_URL})")
    d.add_argument("--max-attempts", type=int, default=5, help="tries per shard")
    d.add_argument("--retry-sleep", type=float, default=2.0, help="seconds before the 2nd try, doubling after each failure")
    d.add_argument("--offline-fallback", action="store_true", help="if the host is unreachable, build the offline corpus instead of failing")
    d.set_defaults(func=_cmd_download)

    i = sub.add_parser("ingest", help="turn your own .txt/.md/.jsonl/.parquet files into shards", formatter_class=fmt)
    i.add_argument("paths", nargs="+", help="files or directories (walked recursively)")
    i.add_argument("--out-dir", default=None, help="where to write the shards (default: <base>/base_data_climbmix, which training reads)")
    i.add_argument("--text-field", default="text", help="JSON field / parquet column holding the document text")
    i.add_argument("--txt-split", choices=["file", "paragraph", "line"], default="file",
                   help="how .txt/.md files become documents: whole file, blank-line separated blocks, or lines")
    g = i.add_mutually_exclusive_group()
    g.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents (evenly spread) for the val shard")
    g.add_argument("--val-docs", type=int, default=None, help="put the first N documents in the val shard instead")
    i.add_argument("--shard-chars", type=int, default=250_000_000, help="close a train shard once it holds this many characters")
    i.add_argument("--max-doc-chars", type=int, default=0, help="cut longer documents at paragraph/line boundaries (0 = keep whole)")
    i.add_argument("--overwrite", action="store_true", help="replace shards already in the output dir")
    i.set_defaults(func=_cmd_ingest)

    o = sub.add_parser("offline", help="build shards from text that ships with Python (no network needed)", formatter_class=fmt)
    o.add_argument("--out-dir", default=None, help="where to write the shards (default: <base>/base_data_climbmix)")
    o.add_argument("--max-chars", type=int, default=DEFAULT_OFFLINE_CHARS, help="stop collecting documents at this many characters")
    o.add_argument("--shard-chars", type=int, default=8_000_000, help="close a train shard once it holds this many characters")
    o.add_argument("--val-fraction", type=float, default=0.02, help="fraction of documents for the val shard")
    o.add_argument("--overwrite", action="store_true", help="replace shards already in the output dir")
    o.set_defaults(func=_cmd_offline)
    return p


def _cmd_download(args):
    kwargs = {"max_attempts": args.max_attempts, "retry_sleep": args.retry_sleep}
    if args.offline_fallback:
        ensure_pretraining_data(args.num_files, args.data_dir, args.base_url, args.num_workers, **kwargs)
        return 0
    failed = download_shards(args.num_files, args.num_workers, args.data_dir, args.base_url, **kwargs)
    if failed:
        log.error("%d shard(s) failed: %s; rerun the same command to retry them", len(failed),
                  ", ".join(map(shard_filename, failed)))
        return 1
    return 0


def _cmd_ingest(args):
    ingest(args.paths, args.out_dir, args.text_field, args.txt_split, args.val_fraction, args.val_docs,
           args.shard_chars, args.max_doc_chars, args.overwrite)
    return 0


def _cmd_offline(args):
    build_offline_corpus(args.out_dir, args.max_chars, args.shard_chars, args.val_fraction, args.overwrite)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # Upstream's form `python -m nanochat.dataset -n 8` (no subcommand) means download.
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["download"] + argv
    args = build_parser().parse_args(argv)
    setup_default_logging()
    try:
        return args.func(args)
    except DatasetError as e:
        log.error("%s", e)  # one line, no traceback: these are problems the user fixes, not bugs
        return 1


if __name__ == "__main__":
    sys.exit(main())
