"""Pretraining shards (nanochat/dataset.py, nanochat/offline_corpus.py): download against a loopback
server, reading splits, ingestion of user text, the offline corpus. No network, no ~/.cache."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset, offline_corpus
from nanochat.dataset import (DatasetError, DatasetHostUnreachable, build_offline_corpus, download_shards,
                              download_single_file, ensure_pretraining_data, ingest, list_parquet_files,
                              parquets_iter_batched, shard_filename)
from nanochat.offline_corpus import docstrings_of, split_long_document

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def hermetic(base_dir, monkeypatch):
    """Every test: the kit's fresh NANOCHAT_BASE_DIR, the default data URL, and loopback without proxies."""
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def shard_bytes(texts, row_group_size=1024, column="text"):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({column: texts}), sink, row_group_size=row_group_size, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_shard(path, texts, row_group_size=1024):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(shard_bytes(texts, row_group_size))


class ShardServer:
    """A loopback HTTP server. routes: name -> list of (status, body) served in turn, the last one repeating."""

    def __init__(self):
        self.routes, self.gets = {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, send_body):
                name = self.path.rsplit("/", 1)[-1]
                if send_body:
                    server.gets[name] = server.gets.get(name, 0) + 1
                queue = server.routes.get(name, [(404, b"not found")])
                status, body = queue[0] if len(queue) == 1 or not send_body else queue.pop(0)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def do_GET(self):
                self._reply(True)

            def do_HEAD(self):
                self._reply(False)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    s = ShardServer()
    yield s
    s.close()


def closed_port_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connecting is refused at once
    return f"http://127.0.0.1:{port}/data"


def read_split(split, data_dir, **kw):
    return [t for batch in parquets_iter_batched(split, data_dir=str(data_dir), **kw) for t in batch]


# -----------------------------------------------------------------------------
# download


def test_download_gets_train_shards_plus_val_shard(server, base_dir):
    for i in (0, 1, dataset.MAX_SHARD):
        server.routes[shard_filename(i)] = [(200, shard_bytes([f"doc {i}"]))]
    # The bare upstream form `-n 2` means `download -n 2`.
    assert dataset.main(["-n", "2", "-w", "2", "--base-url", server.url]) == 0
    data_dir = base_dir / dataset.DATA_DIR_NAME
    assert sorted(os.listdir(data_dir)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert read_split("train", data_dir) == ["doc 0", "doc 1"]
    assert read_split("val", data_dir) == ["doc 6542"]
    # Already present and valid: nothing is fetched again.
    before = dict(server.gets)
    assert dataset.main(["download", "-n", "2", "--base-url", server.url]) == 0
    assert server.gets == before


def test_url_comes_from_environment(server, base_dir, monkeypatch):
    server.routes[shard_filename(dataset.MAX_SHARD)] = [(200, shard_bytes(["v"]))]
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url + "/")
    assert dataset.get_base_url() == server.url
    assert download_shards(0, progress=False) == []
    assert os.path.exists(base_dir / dataset.DATA_DIR_NAME / "shard_06542.parquet")


def test_transient_http_500_is_retried(server, tmp_path):
    server.routes["shard_00000.parquet"] = [(500, b"oops"), (200, shard_bytes(["fine"]))]
    assert download_single_file(0, str(tmp_path), server.url, retry_sleep=0.01)
    assert server.gets["shard_00000.parquet"] == 2
    assert os.listdir(tmp_path) == ["shard_00000.parquet"]


def test_corrupt_download_is_deleted_and_retried(server, tmp_path):
    good = shard_bytes(["real"])
    server.routes["shard_00000.parquet"] = [(200, b"\x00garbage, not parquet" * 50), (200, good[: len(good) // 2]), (200, good)]
    assert download_single_file(0, str(tmp_path), server.url, retry_sleep=0.01)
    assert server.gets["shard_00000.parquet"] == 3
    assert os.listdir(tmp_path) == ["shard_00000.parquet"]  # no temp file left behind
    assert pq.read_table(tmp_path / "shard_00000.parquet").column("text").to_pylist() == ["real"]


def test_persistently_corrupt_download_fails_without_leaving_files(server, tmp_path):
    server.routes["shard_00000.parquet"] = [(200, b"garbage" * 100)]
    assert not download_single_file(0, str(tmp_path), server.url, max_attempts=3, retry_sleep=0.01)
    assert server.gets["shard_00000.parquet"] == 3
    assert os.listdir(tmp_path) == []


def test_parquet_without_text_column_is_rejected(server, tmp_path):
    server.routes["shard_00000.parquet"] = [(200, shard_bytes(["x"], column="content"))]
    assert not download_single_file(0, str(tmp_path), server.url, max_attempts=2, retry_sleep=0.01)
    assert os.listdir(tmp_path) == []


def test_not_found_is_not_retried(server, tmp_path):
    assert not download_single_file(7, str(tmp_path), server.url, retry_sleep=0.01)
    assert server.gets["shard_00007.parquet"] == 1


def test_damaged_existing_file_is_downloaded_again(server, tmp_path):
    (tmp_path / "shard_00000.parquet").write_bytes(b"truncated")
    server.routes["shard_00000.parquet"] = [(200, shard_bytes(["again"]))]
    assert download_single_file(0, str(tmp_path), server.url)
    assert pq.read_table(tmp_path / "shard_00000.parquet").column("text").to_pylist() == ["again"]


def test_failed_shards_give_nonzero_exit(server, base_dir):
    server.routes[shard_filename(dataset.MAX_SHARD)] = [(200, shard_bytes(["v"]))]
    server.routes["shard_00000.parquet"] = [(500, b"down")]
    rc = dataset.main(["-n", "1", "--base-url", server.url, "--retry-sleep", "0.01", "--max-attempts", "2"])
    assert rc == 1
    assert os.listdir(base_dir / dataset.DATA_DIR_NAME) == ["shard_06542.parquet"]


def test_unreachable_host_is_one_clear_line_without_traceback(base_dir):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}  # NANOCHAT_BASE_DIR is the kit's base_dir
    proc = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "1", "--base-url", closed_port_url()],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stderr
    assert "cannot reach the dataset host 127.0.0.1" in errors[0]
    assert "offline" in errors[0] and "ingest" in errors[0]
    assert list_parquet_files(str(base_dir / dataset.DATA_DIR_NAME)) == []


def test_unreachable_host_falls_back_to_offline_corpus(base_dir, monkeypatch, caplog):
    monkeypatch.setattr(dataset, "DEFAULT_OFFLINE_CHARS", 100_000)
    with caplog.at_level("WARNING", logger="nanochat.dataset"):
        assert ensure_pretraining_data(1, base_url=closed_port_url()) == "offline"
    fallback_lines = [r.getMessage() for r in caplog.records if "Falling back" in r.getMessage()]
    assert len(fallback_lines) == 1 and "cannot reach" in fallback_lines[0]
    assert len(read_split("val", base_dir / dataset.DATA_DIR_NAME)) >= 1
    # The next call reuses the corpus instead of trying the host again.
    assert ensure_pretraining_data(1, base_url=closed_port_url()) == "offline"


def test_no_fallback_into_a_partial_climbmix_download(base_dir):
    write_shard(str(base_dir / dataset.DATA_DIR_NAME / "shard_00000.parquet"), ["climbmix"])
    with pytest.raises(DatasetError, match="already holds 1 ClimbMix shard"):
        ensure_pretraining_data(2, base_url=closed_port_url())


def test_download_refuses_a_dir_holding_another_corpus(tmp_path, base_dir):
    (tmp_path / "in.txt").write_text("one\n\ntwo\n\nthree\n")
    ingest([str(tmp_path / "in.txt")], txt_split="paragraph")
    with pytest.raises(DatasetError, match="holds the 'ingest' corpus"):
        download_shards(1, base_url=closed_port_url())


def test_probe_reports_unreachable():
    with pytest.raises(DatasetHostUnreachable, match="cannot reach"):
        dataset.probe_host(closed_port_url() + "/shard_00000.parquet", timeout=5)


# -----------------------------------------------------------------------------
# reading splits


def test_iter_batched_splits_and_row_group_striding(tmp_path):
    write_shard(str(tmp_path / "shard_00000.parquet"), [f"a{i}" for i in range(5)], row_group_size=2)  # rgs: 2,2,1
    write_shard(str(tmp_path / "shard_00001.parquet"), [f"b{i}" for i in range(4)], row_group_size=2)  # rgs: 2,2
    write_shard(str(tmp_path / "shard_00002.parquet"), ["v0", "v1", "v2"], row_group_size=2)
    (tmp_path / "shard_00003.parquet.tmp").write_bytes(b"partial")  # interrupted write: never listed
    assert [os.path.basename(p) for p in list_parquet_files(str(tmp_path))] == [
        "shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    batches = list(parquets_iter_batched("train", data_dir=str(tmp_path)))
    assert batches == [["a0", "a1"], ["a2", "a3"], ["a4"], ["b0", "b1"], ["b2", "b3"]]
    assert read_split("train", tmp_path, start=1, step=2) == ["a2", "a3", "b2", "b3"]
    assert read_split("train", tmp_path, start=0, step=2) == ["a0", "a1", "a4", "b0", "b1"]
    assert read_split("val", tmp_path) == ["v0", "v1", "v2"]
    with pytest.raises(ValueError, match="split"):
        next(parquets_iter_batched("test", data_dir=str(tmp_path)))


def test_iter_batched_needs_two_shards(tmp_path):
    with pytest.raises(DatasetError, match="no pretraining shards"):
        next(parquets_iter_batched("train", data_dir=str(tmp_path)))
    write_shard(str(tmp_path / "shard_06542.parquet"), ["only val"])
    with pytest.raises(DatasetError, match="only one shard"):
        next(parquets_iter_batched("train", data_dir=str(tmp_path)))


def test_legacy_dir_is_used_when_climbmix_dir_is_missing(base_dir, caplog):
    write_shard(str(base_dir / "base_data" / "shard_00000.parquet"), ["old"])
    with caplog.at_level("WARNING", logger="nanochat.dataset"):
        files = list_parquet_files(warn_on_legacy=True)
    assert files == [str(base_dir / "base_data" / "shard_00000.parquet")]
    assert "legacy" in caplog.text


def test_report_names_the_dir_that_training_reads(base_dir):
    # The report and the loader once chose between the ClimbMix and legacy dirs each in their own copy.
    from nanochat import report

    for name in ("base_data", "base_data_climbmix"):  # the legacy dir alone, then both: ClimbMix wins
        write_shard(str(base_dir / name / "shard_00000.parquet"), ["a"])
        write_shard(str(base_dir / name / "shard_00001.parquet"), ["b"])
        where = os.path.dirname(list_parquet_files()[0])
        assert where == str(base_dir / name) == dataset.training_data_dir()
        assert report.dataset_info().endswith(f", in {where}")

# -----------------------------------------------------------------------------
# ingestion


def test_ingest_txt_jsonl_parquet_directory(tmp_path, base_dir):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first paragraph\nstill first\n\n\nsecond paragraph\n")
    (src / "sub" / "b.jsonl").write_text(json.dumps({"body": "json doc 1"}) + "\n\n" + json.dumps({"body": "json doc 2"}) + "\n")
    (src / "notes.bin").write_bytes(b"\x00")  # not a supported type: skipped with a warning
    pq.write_table(pa.table({"body": ["pq doc 1", None, "  ", "pq doc 2"]}), src / "c.parquet")
    manifest = ingest([str(src)], text_field="body", txt_split="paragraph", val_docs=1)
    data_dir = base_dir / dataset.DATA_DIR_NAME
    assert manifest["num_shards"] == 2 and manifest["val_docs"] == 1 and manifest["train_docs"] == 5
    # Sorted walk: a.txt, c.parquet, sub/b.jsonl. The first document goes to val.
    assert read_split("val", data_dir) == ["first paragraph\nstill first"]
    assert read_split("train", data_dir) == ["second paragraph", "pq doc 1", "pq doc 2", "json doc 1", "json doc 2"]
    assert json.loads((data_dir / "manifest.json").read_text())["source"] == "ingest"
    assert sorted(os.listdir(data_dir)) == ["manifest.json", "shard_00000.parquet", "shard_00001.parquet"]


@pytest.mark.parametrize("mode,expected", [
    ("file", ["alpha beta\ngamma\n\ndelta"]),
    ("paragraph", ["alpha beta\ngamma", "delta"]),
    ("line", ["alpha beta", "gamma", "delta"]),
])
def test_txt_split_modes(tmp_path, mode, expected):
    from nanochat.offline_corpus import iter_input_documents

    (tmp_path / "t.txt").write_text("alpha beta\ngamma\n\ndelta\n")
    assert list(iter_input_documents([str(tmp_path / "t.txt")], txt_split=mode)) == expected


def test_ingested_shards_have_the_pretraining_format(tmp_path):
    lines = [f"document number {i} " + "x" * (1 + i % 50) for i in range(3000)]
    (tmp_path / "docs.txt").write_text("\n".join(lines))
    out = tmp_path / "out"
    manifest = ingest([str(tmp_path / "docs.txt")], out_dir=str(out), txt_split="line", val_fraction=0.01, shard_chars=1)
    # shard_chars=1: every train shard closes at its first row-group boundary, i.e. 1024 documents.
    files = list_parquet_files(str(out))
    assert manifest["val_docs"] == 30 and manifest["train_docs"] == 2970 and len(files) == 4
    for path in files[:2]:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.names == ["text"] and pf.metadata.num_rows == 1024 and pf.num_row_groups == 1
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert pq.ParquetFile(files[2]).metadata.num_rows == 2970 - 2048
    val = read_split("val", out)
    assert val[0] == lines[99] and val[1] == lines[199]  # floor((i+1)/100) > floor(i/100): every 100th document
    assert sorted(read_split("train", out) + val) == sorted(lines)


def test_ingest_row_groups_within_a_shard(tmp_path):
    (tmp_path / "d.txt").write_text("\n".join(f"d{i}" for i in range(2500)))
    ingest([str(tmp_path / "d.txt")], out_dir=str(tmp_path / "out"), txt_split="line", val_docs=10)
    train = pq.ParquetFile(list_parquet_files(str(tmp_path / "out"))[0])
    sizes = [train.metadata.row_group(i).num_rows for i in range(train.num_row_groups)]
    assert sizes == [1024, 1024, 442]


@pytest.mark.parametrize("n,sizes", [
    (3, [1, 1, 1]),  # fewer documents than 8: one per row group (the loader strides documents for more ranks)
    (8, [1] * 8),
    (9, [2] + [1] * 7),
    (290, [37, 37] + [36] * 6),  # the default offline corpus's val shard
    (8200, [1024] * 8 + [8]),  # past the 8 * 1024 held in memory: full groups, as in train shards
])
def test_val_shard_has_at_least_8_row_groups(tmp_path, n, sizes):
    lines = [f"d{i}" for i in range(n + 5)]
    (tmp_path / "d.txt").write_text("\n".join(lines))
    ingest([str(tmp_path / "d.txt")], out_dir=str(tmp_path / "out"), txt_split="line", val_docs=n)
    val = pq.ParquetFile(list_parquet_files(str(tmp_path / "out"))[-1])
    assert [val.metadata.row_group(i).num_rows for i in range(val.num_row_groups)] == sizes
    assert read_split("val", tmp_path / "out") == lines[:n]  # in order, nothing lost
    train = pq.ParquetFile(list_parquet_files(str(tmp_path / "out"))[0])
    assert train.num_row_groups == 1  # 5 train documents: train shards keep their 1024-document groups


def test_ingest_moves_a_document_to_val_when_the_fraction_gives_none(tmp_path):
    (tmp_path / "t.txt").write_text("a\nb\nc\n")
    manifest = ingest([str(tmp_path / "t.txt")], out_dir=str(tmp_path / "o"), txt_split="line")
    assert (manifest["train_docs"], manifest["val_docs"]) == (2, 1)
    assert read_split("val", tmp_path / "o") == ["c"]


def test_moving_the_last_document_to_val_can_empty_a_fresh_train_shard(tmp_path):
    (tmp_path / "d.txt").write_text("\n".join(f"d{i}" for i in range(1025)))
    manifest = ingest([str(tmp_path / "d.txt")], out_dir=str(tmp_path / "o"), txt_split="line", val_fraction=0.0005,
                      shard_chars=1)
    assert manifest["num_shards"] == 2 and (manifest["train_docs"], manifest["val_docs"]) == (1024, 1)
    assert read_split("val", tmp_path / "o") == ["d1024"]


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"other": "x"}\n', r"bad\.jsonl:1: expected an object with a string field 'text'"),
])
def test_ingest_bad_jsonl_is_a_clear_error_and_leaves_nothing(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=match):
        ingest([str(tmp_path / "bad.jsonl")], out_dir=str(out))
    assert os.listdir(out) == []  # the staging dir is gone, no shard appeared


def test_ingest_input_errors(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="latin.txt is not UTF-8"):
        ingest([str(tmp_path / "latin.txt")], out_dir=str(tmp_path / "o1"))
    with pytest.raises(DatasetError, match="no such file"):
        ingest([str(tmp_path / "missing.txt")], out_dir=str(tmp_path / "o2"))
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DatasetError, match="no column 'text'.*content"):
        ingest([str(tmp_path / "p.parquet")], out_dir=str(tmp_path / "o3"))
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(DatasetError, match="at least 2"):
        ingest([str(tmp_path / "one.txt")], out_dir=str(tmp_path / "o4"))
    with pytest.raises(DatasetError, match="val-fraction"):
        ingest([str(tmp_path / "one.txt")], out_dir=str(tmp_path / "o5"), val_fraction=0.9)


def test_ingest_does_not_overwrite_without_permission(tmp_path, base_dir, caplog):
    (tmp_path / "t.txt").write_text("a\nb\nc\n")
    assert dataset.main(["ingest", str(tmp_path / "t.txt"), "--txt-split", "line"]) == 0
    with caplog.at_level("ERROR", logger="nanochat.dataset"):
        assert dataset.main(["ingest", str(tmp_path / "t.txt"), "--txt-split", "line"]) == 1
    assert "already holds 2 shard(s) (ingest); pass --overwrite" in caplog.text
    (tmp_path / "u.txt").write_text("x\ny\n")
    assert dataset.main(["ingest", str(tmp_path / "u.txt"), "--txt-split", "line", "--overwrite"]) == 0
    data_dir = base_dir / dataset.DATA_DIR_NAME
    assert read_split("train", data_dir) + read_split("val", data_dir) == ["x", "y"]


def test_split_long_document_prefers_paragraphs_then_lines():
    text = "aaaa\n\nbbbb cccc\ndddd\n\neeeeeeeeeeee"
    pieces = list(split_long_document(text, 10))
    assert pieces == ["aaaa", "bbbb cccc", "dddd", "eeeeeeeeee", "ee"]
    assert all(len(p) <= 10 for p in pieces)


# -----------------------------------------------------------------------------
# offline corpus


def test_offline_corpus_is_deterministic_and_well_formed(tmp_path):
    # val_fraction 0.1: about 100 documents, so the val shard gets enough of them to be cut into 8 row groups.
    a = build_offline_corpus(str(tmp_path / "a"), max_chars=300_000, shard_chars=50_000, val_fraction=0.1)
    b = build_offline_corpus(str(tmp_path / "b"), max_chars=300_000, shard_chars=50_000, val_fraction=0.1)
    files_a, files_b = list_parquet_files(str(tmp_path / "a")), list_parquet_files(str(tmp_path / "b"))
    assert [os.path.basename(p) for p in files_a] == [os.path.basename(p) for p in files_b]
    for fa, fb in zip(files_a, files_b):
        assert open(fa, "rb").read() == open(fb, "rb").read()
    assert a["source"] == "offline" and a["train_docs"] == b["train_docs"] and a["val_docs"] >= 1
    train, val = read_split("train", tmp_path / "a"), read_split("val", tmp_path / "a")
    assert sum(map(len, train + val)) >= 300_000
    assert len(set(train + val)) == len(train + val)  # deduplicated
    assert a["val_docs"] >= 8 and pq.ParquetFile(files_a[-1]).num_row_groups == 8  # 8 ranks each read whole groups


def test_docstrings_of_collects_every_level_and_survives_bad_code():
    source = '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
    assert docstrings_of(source) == "Module doc.\n\nClass doc.\n\nMethod doc."
    assert docstrings_of("print 'python 2'") == ""


def _damaged_parquet(path):
    # Four row groups of text; bytes in the middle overwritten: the footer still reads, the pages do not.
    pq.write_table(pa.table({"text": [f"document {i} " * 50 for i in range(4000)]}), path, row_group_size=1000,
                   compression="none")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, write, problem", [
    ("binary.jsonl", lambda p: p.write_bytes(b'{"text": "ok"}\n' + bytes(range(256)) * 8), "binary.jsonl: not UTF-8 text"),
    ("deep.jsonl", lambda p: p.write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n"),
     "deep.jsonl:2: not usable JSON (nested too deeply)"),
    ("digits.jsonl", lambda p: p.write_text('{"text": "ok", "n": ' + "9" * 5000 + "}\n"),
     "digits.jsonl:1: not usable JSON (Exceeds the limit"),
    ("damaged.parquet", _damaged_parquet, "damaged.parquet: damaged parquet data"),
])
def test_ingest_of_a_bad_input_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, caplog, name, write, problem):
    write(tmp_path / name)
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert dataset.main(["ingest", str(tmp_path / name), "--out-dir", str(out), "--txt-split", "line"]) == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "\n" not in errors[0].getMessage()
    assert errors[0].getMessage().startswith(str(tmp_path / problem.split(":")[0]))
    assert problem in errors[0].getMessage(), errors[0].getMessage()
    assert os.listdir(out) == []  # no partial shard, no staging dir


KILLED_MID_INGEST = """
import os, signal, sys
from nanochat import dataset, offline_corpus
dataset.ShardSetWriter.finish = lambda self, manifest: os.kill(os.getpid(), signal.SIGKILL)
dataset.ingest([sys.argv[1]], out_dir=sys.argv[2], txt_split="line")
"""


def test_the_next_ingest_removes_the_staging_dir_of_a_killed_one(tmp_path, caplog):
    (tmp_path / "t.txt").write_text("a\nb\nc\n")
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_INGEST, str(tmp_path / "t.txt"), str(out)], cwd=REPO_ROOT,
                            timeout=120)
    assert killed.returncode == -9
    assert [name.startswith(".staging-") for name in os.listdir(out)] == [True]
    with caplog.at_level("INFO", logger="nanochat.dataset"):
        ingest([str(tmp_path / "t.txt")], out_dir=str(out), txt_split="line")
    assert not [name for name in os.listdir(out) if name.startswith(".staging-")]
    assert f"Removed 1 staging dir(s) left by an interrupted ingest in {out}" in caplog.text


def test_offline_corpus_leaves_out_this_projects_own_installed_files(tmp_path, monkeypatch):
    # nanochat's METADATA carries its README: with it in the corpus, a README edit changed runcpu.sh's results.
    site = tmp_path / "site-packages"
    docs = {"nanochat-0.1.0.dist-info/METADATA": "our README", "rustbpe-0.1.0.dist-info/METADATA": "our crate",
            "__editable__.nanochat-0.1.0.pth": "/src", "nanochat/README.md": "a wheel install of ours",
            "other-1.0.dist-info/METADATA": "another package", "other/README.md": "its readme",
            "other/nanochat/README.md": "a folder of another package that shares our name"}
    for rel, text in docs.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (site / "__editable___nanochat_0_1_0_finder.py").write_text('"""' + "finder " * 40 + '"""')
    monkeypatch.setattr(offline_corpus, "stdlib_dir", lambda: str(tmp_path / "stdlib"))
    monkeypatch.setattr(offline_corpus, "site_packages_dirs", lambda: [str(site)])
    texts = [text for _path, text in offline_corpus.iter_source_documents()]
    assert texts == ["its readme", "a folder of another package that shares our name", "another package"]
