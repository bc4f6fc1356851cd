"""CORE evaluation (nanochat/core_eval.py): the eval bundle format and download, prompt rendering,
token spans, left-truncation, batched scoring, rank splitting, and exact scores for a model whose
logits the test controls.

The fixture bundle is written in the real format (core.yaml `icl_tasks`, eval_meta_data.csv,
eval_data/<category>/<task>.jsonl rows as upstream's) with a byte-level tokenizer, so every token is
one character and the fake model's preferences decide each example by construction.
"""

import http.server
import io
import os
import random
import socket
import threading
import zipfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import core_eval
from nanochat.core_eval import (EvalBundleError, TaskSpec, compare_with_reference, crop_to_context, ensure_eval_bundle,
                                evaluate_core, evaluate_task, fewshot_indices, format_results_csv,
                                load_task_data, load_task_specs, plan_batches, prepare_examples, render_prompts,
                                score_batch, token_spans)
from nanochat.tokenizer import RustBPETokenizer

VOCAB = 256 + 9  # byte tokens + nanochat's special tokens; BOS = 256


def byte_tokenizer():
    return RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})


class FakeLM(nn.Module):
    """logits[b, t] = bias + W[idx[b, t]]: a unigram preference plus a bigram table the test sets.

    It likes uppercase letters (bias), and after a digit d predicts d+1, after '9' a space, after a
    space '0', after ':' a space. So an all-uppercase option wins a multiple-choice example, an option
    ending in '9' wins a schema example (' 012' follows it), and a continuation ' 0123' after '9' or
    ':' is greedily reproduced. Causal and position-free, so cropping old context changes nothing.
    """

    def __init__(self, context=None):
        super().__init__()
        bias = torch.zeros(VOCAB)
        bias[ord("A"): ord("Z") + 1] = 4.0
        W = torch.zeros(VOCAB, VOCAB)
        for d in range(9):
            W[ord(str(d)), ord(str(d + 1))] = 12.0
        W[ord("9"), ord(" ")] = 12.0
        W[ord(" "), ord("0")] = 12.0
        W[ord(":"), ord(" ")] = 12.0
        self.register_buffer("bias", bias)
        self.register_buffer("W", W)
        self.config = type("Cfg", (), {"sequence_len": context})()
        self.shapes, self.inputs = [], []

    def forward(self, idx):
        if self.config.sequence_len is not None:
            assert idx.size(1) <= self.config.sequence_len, f"fed {idx.size(1)} tokens to a {self.config.sequence_len}-token model"
        self.shapes.append(tuple(idx.shape))
        self.inputs.append(idx.clone())
        return self.bias + self.W[idx]  # (B, T, V)


class TinyCausalLM(nn.Module):
    """A random one-block transformer: real attention, so padding/batching mistakes would show."""

    def __init__(self, d=32, heads=4, max_len=512):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.emb, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(max_len, d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, idx):
        B, T = idx.shape
        x = self.emb(idx) + self.pos(torch.arange(T))
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, D)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1))
        return self.head(x + self.mlp(x))


# -----------------------------------------------------------------------------
# A tiny bundle in the real format. Each task: (label, category, type, shots, delimiter, baseline, rows, rule)
# where rule(row) says whether FakeLM gets the row right.

LOWER = ["sun", "tree", "river", "stone", "cloud", "grass"]
UPPER = ["RAIN", "SNOW", "WIND", "FIRE", "MOON", "STAR"]


def _mc_rows(n, n_choices, n_correct, query):
    rows = []
    for i in range(n):
        choices = [LOWER[(i + j) % len(LOWER)] for j in range(n_choices)]
        upper_at = i % n_choices
        choices[upper_at] = UPPER[i % len(UPPER)]
        gold = upper_at if i < n_correct else (upper_at + 1) % n_choices
        rows.append({"query": query.format(i=i), "choices": choices, "gold": gold})
    return rows


def _schema_rows(n, n_correct):
    rows = []
    for i in range(n):
        options = [f"Tom saw {i} and 9", f"Ann saw {i} and 5"] if i % 2 == 0 else [f"Ann saw {i} and 5", f"Tom saw {i} and 9"]
        nine_at = 0 if i % 2 == 0 else 1
        rows.append({"context_options": options, "continuation": "012", "gold": nine_at if i < n_correct else 1 - nine_at})
    return rows


def _jeopardy_rows(n, n_correct):
    return [{"context": f"  Clue {i}: count up from zero ", "continuation": "0123" if i < n_correct else "0125"} for i in range(n)]


def _lambada_rows(n, n_correct):
    return [{"context": f"The count {i} reaches {'9' if i < n_correct else '5'}", "continuation": "012"} for i in range(n)]


def fixture_tasks():
    return [
        ("copa", "commonsense_reasoning", "multiple_choice", 0, " ", 50.0, _mc_rows(8, 2, 6, "Premise {i} so"),
         lambda r: r["choices"][r["gold"]].isupper()),
        ("arc_easy", "world_knowledge", "multiple_choice", 10, "\nAnswer: ", 25.0, _mc_rows(12, 4, 9, "Question {i}: which one?"),
         lambda r: r["choices"][r["gold"]].isupper()),
        ("winograd", "language_understanding", "schema", 0, " ", 50.0, _schema_rows(6, 4),
         lambda r: r["context_options"][r["gold"]].endswith("9")),
        ("jeopardy", "world_knowledge", "language_modeling", 10, "\nAnswer: ", 0.0, _jeopardy_rows(12, 8),
         lambda r: r["continuation"] == "0123"),
        ("lambada_openai", "language_understanding", "language_modeling", 0, " ", 0.0, _lambada_rows(5, 2),
         lambda r: r["context"].endswith("9")),
    ]


# Accuracy per task by construction (n_correct / n), and the centered scores.
EXPECTED_ACC = {"copa": 6 / 8, "arc_easy": 9 / 12, "winograd": 4 / 6, "jeopardy": 8 / 12, "lambada_openai": 2 / 5}
EXPECTED_CENTERED = {"copa": 0.5, "arc_easy": (0.75 - 0.25) / 0.75, "winograd": (4 / 6 - 0.5) / 0.5,
                     "jeopardy": 8 / 12, "lambada_openai": 0.4}


def _yaml_str(s):
    return '"' + s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') + '"'


def write_bundle(root, tasks=None):
    """Write <root>/eval_bundle in the real layout; returns its path."""
    import json

    tasks = fixture_tasks() if tasks is None else tasks
    bundle = os.path.join(root, "eval_bundle")
    yaml_lines, csv_lines = ["icl_tasks:"], ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    for label, category, typ, shots, delim, baseline, rows, _ in tasks:
        uri = f"{category}/{label}.jsonl"
        yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]", f"  icl_task_type: {typ}"]
        if delim != " " or shots == 0:  # the real file omits the default delimiter on some tasks
            yaml_lines.append(f"  continuation_delimiter: {_yaml_str(delim)}")
        csv_lines.append(f"{label},{category},{typ},{shots},{len(rows)},{baseline:g},Yes,\"fixture, {label}\"")
        os.makedirs(os.path.join(bundle, "eval_data", category), exist_ok=True)
        with open(os.path.join(bundle, "eval_data", uri), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(bundle, "core.yaml"), "w", encoding="utf-8") as f:
        f.write("\n".join(yaml_lines) + "\n")
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(csv_lines) + "\n")
    return bundle


def zip_bundle(bundle):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for dirpath, _, files in os.walk(bundle):
            for name in files:
                full = os.path.join(dirpath, name)
                zf.write(full, os.path.join("eval_bundle", os.path.relpath(full, bundle)))
    return buf.getvalue()


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(str(tmp_path / "fixture"))


# -----------------------------------------------------------------------------
# Bundle format


def test_task_specs_from_yaml_and_csv(bundle):
    specs = load_task_specs(bundle)
    assert [s.label for s in specs] == ["copa", "arc_easy", "winograd", "jeopardy", "lambada_openai"]
    arc = specs[1]
    assert (arc.task_type, arc.num_fewshot, arc.delimiter, arc.random_baseline) == ("multiple_choice", 10, "\nAnswer: ", 25.0)
    assert arc.dataset_uri == "world_knowledge/arc_easy.jsonl"
    assert {s.task_type for s in specs} == {"multiple_choice", "schema", "language_modeling"}


def test_missing_baseline_is_a_clear_error(bundle):
    path = os.path.join(bundle, "eval_meta_data.csv")
    lines = open(path, encoding="utf-8").read().splitlines()
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(line for line in lines if not line.startswith("winograd")) + "\n")
    with pytest.raises(EvalBundleError, match="no 'Random baseline' row for task 'winograd'"):
        load_task_specs(bundle)


def test_reference_table_is_the_22_task_suite(bundle):
    assert len(core_eval.REFERENCE_TASKS) == 22
    ref_specs = [TaskSpec(label, typ, shots, delim, f"x/{label}.jsonl", rb) for label, typ, shots, delim, rb, _ in core_eval.REFERENCE_TASKS]
    assert compare_with_reference(ref_specs) == []
    # Our fixture tasks use the reference settings, so only the task list differs.
    diffs = compare_with_reference(load_task_specs(bundle))
    assert len(diffs) == 1 and "task list differs" in diffs[0]
    changed = [s if s.label != "piqa" else TaskSpec("piqa", "multiple_choice", 5, " ", "p", 50.0) for s in ref_specs]
    assert any(d.startswith("piqa:") for d in compare_with_reference(changed))


def test_data_is_shuffled_with_seed_1337(bundle):
    spec = load_task_specs(bundle)[1]
    original = _mc_rows(12, 4, 9, "Question {i}: which one?")
    random.Random(1337).shuffle(original)
    assert load_task_data(bundle, spec) == original


# -----------------------------------------------------------------------------
# Prompts


def test_renderings_match_upstream_examples():
    fewshot = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Q", "choices": ["x", "y"], "gold": 0}
    assert render_prompts(item, fewshot, "multiple_choice", "\nAnswer: ")[0] == "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ\nAnswer: x"
    assert render_prompts(item, [], "multiple_choice", " ") == ["Q x", "Q y"]
    lm = render_prompts({"context": " The ctx ", "continuation": "word"}, [{"context": "ctx1\n", "continuation": "c1"}],
                        "language_modeling", " ")
    assert lm == ["ctx1 c1\n\nThe ctx", "ctx1 c1\n\nThe ctx word"]
    assert render_prompts({"context": "Clue", "continuation": "Paris"}, [], "language_modeling", "\nAnswer: ") == ["Clue\nAnswer:", "Clue\nAnswer: Paris"]
    schema = render_prompts({"context_options": ["A", "B"], "continuation": "ran", "gold": 0},
                            [{"context_options": ["C", "D"], "continuation": "sat", "gold": 1}], "schema", " ")
    assert schema == ["D sat\n\nA ran", "D sat\n\nB ran"]


def test_fewshot_draw_equals_sampling_from_the_materialised_list():
    for n, idx, k in [(20, 0, 10), (20, 19, 10), (1000, 500, 10), (4, 2, 3), (11, 5, 10)]:
        expected = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
        assert fewshot_indices(n, idx, k) == expected
        assert idx not in expected
    assert fewshot_indices(5, 0, 0) == []
    with pytest.raises(ValueError, match="need at least 11 examples"):
        fewshot_indices(10, 0, 10)


def _unpad(row, pad=256):
    """A fed row without its right padding (BOS is the pad; inside a row it only comes first)."""
    while row and row[-1] == pad:
        row = row[:-1]
    return tuple(row)


def test_max_per_task_does_not_change_prompts(tmp_path):
    """Upstream drew few-shot examples from the truncated list (spec 02 §9.8); ours come from the whole task."""
    rows = _mc_rows(12, 2, 8, "Question {i}: which one?")
    bundle = write_bundle(str(tmp_path), [("piqa", "commonsense_reasoning", "multiple_choice", 2, "\nAnswer: ", 50.0, rows, None)])
    tok, spec = byte_tokenizer(), load_task_specs(bundle)[0]
    data = load_task_data(bundle, spec)
    first4 = prepare_examples(tok, data, [0, 1, 2, 3], spec)
    assert [ex.seqs for ex in first4] == [ex.seqs for ex in prepare_examples(tok, data, list(range(12)), spec)[:4]]
    model = FakeLM()
    out = evaluate_core(model, tok, "cpu", max_per_task=4, bundle_dir=bundle)
    fed = sorted(_unpad(row) for batch in model.inputs for row in batch.tolist())
    assert fed == sorted(tuple(s) for ex in first4 for s in ex.seqs)
    full = evaluate_task(model, tok, data, "cpu", spec)
    assert out["results"]["piqa"] == pytest.approx(full[:4].mean().item())


# -----------------------------------------------------------------------------
# Token spans and truncation


def test_token_spans_per_type():
    seqs, starts, ends = token_spans([[9, 1, 2, 3], [9, 1, 2, 4, 5], [9, 1, 7]], "multiple_choice")
    assert starts == [2, 2, 2] and ends == [4, 5, 3]
    seqs, starts, ends = token_spans([[9, 1, 5, 6], [9, 2, 3, 5, 6]], "schema")
    assert starts == [2, 3] and ends == [4, 5]
    seqs, starts, ends = token_spans([[9, 1, 2], [9, 1, 2, 3, 4]], "language_modeling")
    assert seqs == [[9, 1, 2, 3, 4]] and starts == [3] and ends == [5]
    with pytest.raises(ValueError, match="not a prefix"):
        token_spans([[9, 1, 2], [9, 1, 7, 3]], "language_modeling", "jeopardy", 4)
    rng = random.Random(0)
    for _ in range(200):  # the min/max shortcut agrees with the definition
        seqs = [[rng.randrange(3) for _ in range(rng.randrange(1, 6))] for _ in range(rng.randrange(1, 5))]
        prefix = next((i for i in range(min(map(len, seqs))) if len({s[i] for s in seqs}) > 1), min(map(len, seqs)))
        suffix = next((i for i in range(min(map(len, seqs))) if len({s[-1 - i] for s in seqs}) > 1), min(map(len, seqs)))
        assert (core_eval._common_prefix_len(seqs), core_eval._common_suffix_len(seqs)) == (prefix, suffix)
    # identical options still score one token each instead of an empty (NaN) span
    _, starts, ends = token_spans([[9, 1, 2], [9, 1, 2]], "multiple_choice")
    assert starts == [2, 2] and ends == [3, 3]


def test_crop_keeps_the_last_tokens_and_shifts_spans():
    seqs, starts, ends = crop_to_context([list(range(20)), list(range(6))], [15, 3], [20, 6], 8)
    assert seqs == [list(range(12, 20)), list(range(6))]
    assert starts == [3, 3] and ends == [8, 6]
    # a continuation longer than the context keeps every token that still has a prediction
    _, starts, ends = crop_to_context([list(range(20))], [5], [20], 8)
    assert starts == [1] and ends == [8]
    assert crop_to_context([[1, 2, 3]], [1], [3], None) == ([[1, 2, 3]], [1], [3])


def test_long_prompts_are_left_truncated_to_the_model_context(tmp_path):
    long_lm = [{"context": "x" * 200 + f" item {i} 9", "continuation": "0123"} for i in range(3)]
    long_mc = [{"query": "y" * 150 + f" {i}", "choices": ["RED", "blue"], "gold": 0} for i in range(3)]
    bundle = write_bundle(str(tmp_path), [
        ("lambada_openai", "language_understanding", "language_modeling", 0, " ", 0.0, long_lm, None),
        ("copa", "commonsense_reasoning", "multiple_choice", 0, " ", 50.0, long_mc, None),
    ])
    model = FakeLM(context=32)  # asserts it never sees more than 32 tokens
    out = evaluate_core(model, byte_tokenizer(), "cpu", bundle_dir=bundle)
    assert out["results"] == {"lambada_openai": 1.0, "copa": 1.0}
    assert max(shape[1] for shape in model.shapes) == 32
    # an explicit max_seq_len overrides the model's
    model.shapes.clear()
    evaluate_core(model, byte_tokenizer(), "cpu", bundle_dir=bundle, max_seq_len=16)
    assert max(shape[1] for shape in model.shapes) == 16


# -----------------------------------------------------------------------------
# Scores


def test_exact_scores_centered_accuracy_and_core(bundle):
    tok, model = byte_tokenizer(), FakeLM()
    out = evaluate_core(model, tok, "cpu", bundle_dir=bundle)
    assert out["results"] == pytest.approx(EXPECTED_ACC, abs=1e-6)
    assert out["centered_results"] == pytest.approx(EXPECTED_CENTERED, abs=1e-6)
    assert out["core_metric"] == pytest.approx(sum(EXPECTED_CENTERED.values()) / 5, abs=1e-6)
    assert list(out["results"]) == ["copa", "arc_easy", "winograd", "jeopardy", "lambada_openai"]
    # and example by example, in the shuffled order
    rules = {t[0]: t[7] for t in fixture_tasks()}
    for spec in load_task_specs(bundle):
        data = load_task_data(bundle, spec)
        correct = evaluate_task(model, tok, data, "cpu", spec)
        assert correct.tolist() == [float(rules[spec.label](r)) for r in data]


def test_multiple_choice_ties_go_to_the_first_option(tmp_path):
    rows = [{"query": "Q", "choices": ["AB", "CD"], "gold": 1}, {"query": "Q", "choices": ["AB", "CD"], "gold": 0}]
    spec = TaskSpec("copa", "multiple_choice", 0, " ", "x", 50.0)
    correct = evaluate_task(FakeLM(), byte_tokenizer(), rows, "cpu", spec)
    assert correct.tolist() == [0.0, 1.0]  # both options equally likely: argmin picks option 0


def test_batched_scoring_equals_one_example_per_forward(bundle):
    tok, model = byte_tokenizer(), TinyCausalLM().eval()
    for spec in load_task_specs(bundle):
        data = load_task_data(bundle, spec)
        examples = prepare_examples(tok, data, list(range(len(data))), spec)
        single = {ex.index: score_batch(model, [ex], "cpu", tok.get_bos_token_id())[0] for ex in examples}
        batches = plan_batches(examples, batch_tokens=4096)
        assert len(batches) < len(examples)
        for batch in batches:
            assert sum(len(ex.seqs) for ex in batch) * max(len(s) for ex in batch for s in ex.seqs) <= 4096 or len(batch) == 1
            for ex, (ok, losses) in zip(batch, score_batch(model, batch, "cpu", tok.get_bos_token_id())):
                assert ok == single[ex.index][0]
                assert losses == pytest.approx(single[ex.index][1], abs=1e-5)


def test_batch_planning_groups_examples_and_counts_forwards(bundle):
    tok = byte_tokenizer()
    spec = load_task_specs(bundle)[1]
    data = load_task_data(bundle, spec)
    one, many = FakeLM(), FakeLM()
    a = evaluate_task(one, tok, data, "cpu", spec, batch_tokens=0)
    b = evaluate_task(many, tok, data, "cpu", spec, batch_tokens=1 << 20)
    assert torch.equal(a, b)
    assert len(one.shapes) == len(data) and all(s[0] == 4 for s in one.shapes)  # all 4 choices of one example per forward
    assert many.shapes == [(4 * len(data), max(s[1] for s in one.shapes))]
    assert core_eval.default_batch_tokens("cpu") == 2048 and core_eval.default_batch_tokens(torch.device("cuda", 0)) == 8192


def test_rank_split_merges_to_the_single_process_result(bundle):
    tok, model = byte_tokenizer(), FakeLM()
    for spec in load_task_specs(bundle):
        data = load_task_data(bundle, spec)
        full = evaluate_task(model, tok, data, "cpu", spec)
        parts = [evaluate_task(model, tok, data, "cpu", spec, rank=r, world_size=2) for r in (0, 1)]
        assert torch.equal(parts[0][1::2], torch.zeros_like(parts[0][1::2]))  # rank 0 scores even indices only
        assert torch.equal(parts[0] + parts[1], full)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world_size, port, bundle, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out = evaluate_core(FakeLM(), byte_tokenizer(), "cpu", bundle_dir=bundle)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_all_reduce_to_the_same_scores(bundle, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, _free_port(), bundle, str(tmp_path)), nprocs=2, join=True)
    single = evaluate_core(FakeLM(), byte_tokenizer(), "cpu", bundle_dir=bundle)
    for rank in (0, 1):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        assert got["results"] == single["results"]
        assert got["core_metric"] == single["core_metric"]


def test_results_csv_format():
    text = format_results_csv({"hellaswag_zeroshot": 0.446624, "boolq": 0.4}, {"hellaswag_zeroshot": 0.262166, "boolq": -0.578947},
                              0.1957)
    assert text.splitlines() == [
        "Task                               , Accuracy  , Centered  ",
        "hellaswag_zeroshot                 , 0.446624  , 0.262166  ",
        "boolq                              , 0.400000  , -0.578947 ",
        "CORE                               ,           , 0.195700  ",
    ]
    assert text.endswith("\n")


# -----------------------------------------------------------------------------
# Download


class _Server:
    """A loopback HTTP server that serves one body at /eval_bundle.zip and counts requests."""

    def __init__(self, body):
        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if self.path != "/eval_bundle.zip":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_download_unpacks_once_and_is_cached(bundle, tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    with _Server(zip_bundle(bundle)) as server:
        monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", server.url)
        path = ensure_eval_bundle()
        assert path == str(base / "eval_bundle")
        assert sorted(os.listdir(path)) == ["core.yaml", "eval_data", "eval_meta_data.csv"]
        assert (base / "eval_bundle.zip").exists()  # the zip stays, like upstream
        assert ensure_eval_bundle() == path
        assert server.requests == 1
        out = evaluate_core(FakeLM(), byte_tokenizer(), "cpu")  # finds the bundle in the base dir
        assert out["results"] == pytest.approx(EXPECTED_ACC, abs=1e-6)
        assert server.requests == 1
    assert not [n for n in os.listdir(base) if n.startswith(".eval_bundle.")]  # no temp dirs left


def test_pre_placed_zip_needs_no_network(bundle, tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    (base / "eval_bundle.zip").write_bytes(zip_bundle(bundle))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"http://127.0.0.1:{_free_port()}/eval_bundle.zip")
    assert os.path.isfile(os.path.join(ensure_eval_bundle(), "core.yaml"))


def test_unreachable_url_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    url = f"http://127.0.0.1:{_free_port()}/eval_bundle.zip"
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url)
    with pytest.raises(EvalBundleError) as err:
        ensure_eval_bundle()
    assert url in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "eval_bundle").exists() and not (tmp_path / "eval_bundle.zip").exists()


def test_a_download_that_is_not_a_bundle_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with _Server(b"<html>not a zip</html>") as server:
        monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", server.url)
        with pytest.raises(EvalBundleError, match="not a valid zip"):
            ensure_eval_bundle()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("something/else.txt", "hi")
    (tmp_path / "eval_bundle.zip").write_bytes(buf.getvalue())
    with pytest.raises(EvalBundleError, match="no core.yaml"):
        ensure_eval_bundle()
