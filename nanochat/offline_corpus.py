"""
Documents from local files, for nanochat/dataset.py (the CLI) to turn into shards; nothing here writes files.

User input (`ingest`): .txt/.md files (one document each, or per blank-line paragraph or line: `txt_split`),
.jsonl lines (the object's `text_field`), .parquet files (the `text_field` column); directories walked sorted.

The offline corpus (`offline`, and the fallback without network): each file one document, exact duplicates
dropped, in this order: 1. the running interpreter's standard library (.py, .txt, .rst); 2. the installed
packages' READMEs, licences, .md/.rst files and dist-info METADATA; 3. the installed packages' Python files,
reduced to their docstrings. Its content depends on the installation (CPython 3.11's stdlib alone is ~32M
characters); two builds on one installation see the same documents in the same order. This project's own
distributions (OWN_DISTRIBUTIONS) are left out: nanochat's METADATA carries the README, so every README edit would
change the training data, and two commits' runcpu.sh results would differ for that reason alone.
"""

import ast
import hashlib
import json
import logging
import os
import sysconfig
import warnings

from nanochat.dataset import ROW_GROUP_SIZE, DatasetError

log = logging.getLogger("nanochat.offline_corpus")

STDLIB_EXTENSIONS = (".py", ".txt", ".rst")
DOC_EXTENSIONS = (".md", ".rst")
DOC_NAME_PREFIXES = ("readme", "license", "licence", "copying", "notice", "authors")
MIN_DOCSTRING_CHARS = 200  # a file whose docstrings are shorter than this is mostly code, not prose
MAX_FILE_BYTES = 8 << 20  # skip generated giants (data tables) that would dominate a shard
OWN_DISTRIBUTIONS = ("nanochat", "rustbpe")


def stdlib_dir():
    return sysconfig.get_paths()["stdlib"]  # the base interpreter's, inside a venv too


def site_packages_dirs():
    dirs = [os.path.realpath(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")]
    return [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]]  # often purelib == platlib


def _walk_sorted(root, skip_dir=lambda name: name == "__pycache__", skip_top=lambda name: False):
    """Yield file paths under `root`, depth first, names sorted at every level: the same order on every run.
    skip_dir(name) leaves out directories at any depth, skip_top(name) files and directories directly in root."""
    for dirpath, dirnames, filenames in os.walk(root):
        top = skip_top if dirpath == root else lambda name: False
        dirnames[:] = sorted(d for d in dirnames if not skip_dir(d) and not top(d))
        for name in sorted(filenames):
            if not top(name):
                yield os.path.join(dirpath, name)


def _read_text(path):  # None unless a small-enough UTF-8 text file
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        # Unreadable or not UTF-8 (a few stdlib test files are latin-1 on purpose): deterministic skip.
        return None


def _is_ours(name):
    """A site-packages entry installed by this project: its package, its .dist-info, its editable-install files."""
    name = name.lower()
    if name.startswith("__editable__"):  # .pth and import finders of editable installs: machinery, not prose
        return True
    return name.split("-", 1)[0] in OWN_DISTRIBUTIONS and (name.endswith(".dist-info") or "-" not in name)


def _is_package_doc(path):
    name = os.path.basename(path).lower()
    if name == "metadata" and os.path.basename(os.path.dirname(path)).endswith(".dist-info"):
        return True  # it carries the package's README
    return name.startswith(DOC_NAME_PREFIXES) or name.endswith(DOC_EXTENSIONS)


def docstrings_of(source):
    """All docstrings of a Python source, cleaned, blank-line separated; "" when it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. in third-party code
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                parts.append(doc)
    return "\n\n".join(parts)


def iter_source_documents():
    """Yield (path, text) for every candidate document, in the fixed order the module docstring gives."""
    std = stdlib_dir()
    for path in _walk_sorted(std, skip_dir=lambda d: d in ("site-packages", "dist-packages", "__pycache__")):
        if path.endswith(STDLIB_EXTENSIONS):
            text = _read_text(path)
            if text is not None:
                yield path, text
    site_dirs = [d for d in site_packages_dirs() if not d.startswith(std + os.sep)]
    for site in site_dirs:
        for path in _walk_sorted(site, skip_top=_is_ours):
            if _is_package_doc(path):
                text = _read_text(path)
                if text is not None:
                    yield path, text
    for site in site_dirs:
        for path in _walk_sorted(site, skip_top=_is_ours):
            if path.endswith(".py"):
                text = _read_text(path)
                doc = docstrings_of(text) if text is not None else ""
                if len(doc) >= MIN_DOCSTRING_CHARS:
                    yield path, doc


def iter_offline_documents(max_chars=None):
    """Deduplicated, non-empty texts until their total reaches `max_chars` (None = all), the one crossing it whole."""
    seen = set()
    total = 0
    for _path, text in iter_source_documents():
        text = text.strip()
        if not text:
            continue
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


INPUT_EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")


def _expand_inputs(paths):
    """The input files named by `paths`: files as given, directories walked recursively in sorted order."""
    files, skipped = [], 0
    for p in paths:
        if os.path.isdir(p):
            for path in _walk_sorted(p, skip_dir=lambda d: d.startswith(".")):
                name = os.path.basename(path)
                if name.lower().endswith(INPUT_EXTENSIONS) and not name.startswith("."):
                    files.append(path)
                else:
                    skipped += 1
        elif os.path.isfile(p):
            if not p.lower().endswith(INPUT_EXTENSIONS):
                raise DatasetError(f"{p}: unsupported file type; ingest reads {', '.join(INPUT_EXTENSIONS)}")
            files.append(p)
        else:
            raise DatasetError(f"{p}: no such file or directory")
    if skipped:
        log.warning("Skipped %d file(s) in the input directories that are not %s", skipped, "/".join(INPUT_EXTENSIONS))
    if not files:
        raise DatasetError(f"no {'/'.join(INPUT_EXTENSIONS)} files found in {', '.join(map(str, paths))}")
    return files


def _iter_txt(path, txt_split):
    try:
        with open(path, encoding="utf-8") as f:
            if txt_split == "file":
                yield f.read()
            elif txt_split == "line":
                yield from f
            else:  # paragraph: blocks separated by one or more blank (whitespace-only) lines
                block = []
                for line in f:
                    if line.strip():
                        block.append(line)
                    elif block:
                        yield "".join(block)
                        block = []
                if block:
                    yield "".join(block)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 ({e.reason} at byte {e.start}); convert it first, "
                           f"e.g. `iconv -f latin1 -t utf-8`") from None


def _iter_jsonl(path, text_field):
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise DatasetError(f"{path}:{lineno}: not usable JSON (nested too deeply)") from None
                except ValueError as e:  # e.g. an integer past Python's 4,300-digit conversion limit
                    raise DatasetError(f"{path}:{lineno}: not usable JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise DatasetError(f"{path}:{lineno}: expected an object with a string field {text_field!r} "
                                       f"(choose the field with --text-field)")
                yield row[text_field]
    except UnicodeDecodeError as e:
        # (no line number: the file is decoded in blocks, ahead of the line being read)
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason}); is it a binary file?") from None


def _iter_parquet(path, text_field):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise DatasetError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                           f"choose one with --text-field")
    try:
        for batch in pf.iter_batches(columns=[text_field], batch_size=ROW_GROUP_SIZE):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    if not isinstance(text, str):
                        raise DatasetError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
                    yield text
    except (pa.ArrowException, OSError) as e:  # damage past the footer shows only when its pages are read
        raise DatasetError(f"{path}: damaged parquet data ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def split_long_document(text, max_chars):
    """Yield pieces of `text` of at most max_chars, cut at paragraph, else line, else hard boundaries."""
    while len(text) > max_chars:
        cut = text.rfind("\n\n", 0, max_chars)
        if cut <= 0:
            cut = text.rfind("\n", 0, max_chars)
        if cut <= 0:
            cut = max_chars
        head, text = text[:cut].strip(), text[cut:].strip()
        if head:
            yield head
    if text:
        yield text


def iter_input_documents(paths, text_field="text", txt_split="file", max_doc_chars=0):
    """Yield the non-empty documents of the input files, stripped, in path order."""
    if txt_split not in ("file", "paragraph", "line"):
        raise DatasetError(f"--txt-split must be file, paragraph or line, got {txt_split!r}")
    if max_doc_chars < 0:
        raise DatasetError(f"--max-doc-chars must be >= 0 (0 = no limit), got {max_doc_chars}")
    long_docs = 0
    for path in _expand_inputs(paths):
        lower = path.lower()
        if lower.endswith(".jsonl"):
            docs = _iter_jsonl(path, text_field)
        elif lower.endswith(".parquet"):
            docs = _iter_parquet(path, text_field)
        else:
            docs = _iter_txt(path, txt_split)
        for text in docs:
            text = text.strip()
            if not text:
                continue
            if max_doc_chars:
                yield from split_long_document(text, max_doc_chars)
                continue
            long_docs += len(text) > 100_000
            yield text
    if long_docs:
        log.warning("%d document(s) are longer than 100,000 characters; the pretraining loader uses only about one "
                    "context window of a document, so consider --max-doc-chars (or --txt-split paragraph)", long_docs)
