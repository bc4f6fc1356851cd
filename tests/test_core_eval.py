"""CORE evaluation (nanochat/core_eval.py): the eval bundle format and download, prompt rendering,
token spans, left-truncation, batched scoring, rank splitting, and exact scores for a model whose
logits the test controls.

The fixture bundle (tests/core_bundle.py) is written in the real format (core.yaml `icl_tasks`,
eval_meta_data.csv, eval_data/<category>/<task>.jsonl rows as upstream's) and read with a byte-level
tokenizer, so every token is one character and the fake model's preferences decide each example by
construction.
"""

import http.server
import io
import os
import random
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

from core_bundle import EXPECTED_ACC, EXPECTED_CENTERED, VOCAB, FakeLM, fixture_tasks, mc_rows, write_bundle, zip_bundle
from dist_harness import free_port


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
    original = mc_rows(12, 4, 9, "Question {i}: which one?")
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


def test_max_per_task_does_not_change_prompts(tmp_path, byte_tokenizer):
    """Upstream drew few-shot examples from the truncated list ; ours come from the whole task."""
    rows = mc_rows(12, 2, 8, "Question {i}: which one?")
    bundle = write_bundle(str(tmp_path), [("piqa", "commonsense_reasoning", "multiple_choice", 2, "\nAnswer: ", 50.0, rows, None)])
    tok, spec = byte_tokenizer, load_task_specs(bundle)[0]
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


def test_long_prompts_are_left_truncated_to_the_model_context(tmp_path, byte_tokenizer):
    long_lm = [{"context": "x" * 200 + f" item {i} 9", "continuation": "0123"} for i in range(3)]
    long_mc = [{"query": "y" * 150 + f" {i}", "choices": ["RED", "blue"], "gold": 0} for i in range(3)]
    bundle = write_bundle(str(tmp_path), [
        ("lambada_openai", "language_understanding", "language_modeling", 0, " ", 0.0, long_lm, None),
        ("copa", "commonsense_reasoning", "multiple_choice", 0, " ", 50.0, long_mc, None),
    ])
    model = FakeLM(context=32)  # asserts it never sees more than 32 tokens
    out = evaluate_core(model, byte_tokenizer, "cpu", bundle_dir=bundle)
    assert out["results"] == {"lambada_openai": 1.0, "copa": 1.0}
    assert max(shape[1] for shape in model.shapes) == 32
    # an explicit max_seq_len overrides the model's
    model.shapes.clear()
    evaluate_core(model, byte_tokenizer, "cpu", bundle_dir=bundle, max_seq_len=16)
    assert max(shape[1] for shape in model.shapes) == 16


# -----------------------------------------------------------------------------
# Scores


def test_exact_scores_centered_accuracy_and_core(bundle, byte_tokenizer):
    tok, model = byte_tokenizer, FakeLM()
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


def test_multiple_choice_ties_go_to_the_first_option(byte_tokenizer):
    rows = [{"query": "Q", "choices": ["AB", "CD"], "gold": 1}, {"query": "Q", "choices": ["AB", "CD"], "gold": 0}]
    spec = TaskSpec("copa", "multiple_choice", 0, " ", "x", 50.0)
    correct = evaluate_task(FakeLM(), byte_tokenizer, rows, "cpu", spec)
    assert correct.tolist() == [0.0, 1.0]  # both options equally likely: argmin picks option 0


def test_batched_scoring_equals_one_example_per_forward(bundle, byte_tokenizer):
    tok, model = byte_tokenizer, TinyCausalLM().eval()
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


def test_batch_planning_groups_examples_and_counts_forwards(bundle, byte_tokenizer):
    tok = byte_tokenizer
    spec = load_task_specs(bundle)[1]
    data = load_task_data(bundle, spec)
    one, many = FakeLM(), FakeLM()
    a = evaluate_task(one, tok, data, "cpu", spec, batch_tokens=0)
    b = evaluate_task(many, tok, data, "cpu", spec, batch_tokens=1 << 20)
    assert torch.equal(a, b)
    assert len(one.shapes) == len(data) and all(s[0] == 4 for s in one.shapes)  # all 4 choices of one example per forward
    assert many.shapes == [(4 * len(data), max(s[1] for s in one.shapes))]
    assert core_eval.default_batch_tokens("cpu") == 2048 and core_eval.default_batch_tokens(torch.device("cuda", 0)) == 8192


def test_rank_split_merges_to_the_single_process_result(bundle, byte_tokenizer):
    tok, model = byte_tokenizer, FakeLM()
    for spec in load_task_specs(bundle):
        data = load_task_data(bundle, spec)
        full = evaluate_task(model, tok, data, "cpu", spec)
        parts = [evaluate_task(model, tok, data, "cpu", spec, rank=r, world_size=2) for r in (0, 1)]
        assert torch.equal(parts[0][1::2], torch.zeros_like(parts[0][1::2]))  # rank 0 scores even indices only
        assert torch.equal(parts[0] + parts[1], full)


def _dist_worker(rank, world_size, tok, bundle):
    return evaluate_core(FakeLM(), tok, "cpu", bundle_dir=bundle)


def test_two_gloo_ranks_all_reduce_to_the_same_scores(bundle, byte_tokenizer, run_on_ranks):
    per_rank = run_on_ranks(_dist_worker, byte_tokenizer, bundle)
    single = evaluate_core(FakeLM(), byte_tokenizer, "cpu", bundle_dir=bundle)
    for got in per_rank:
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


def test_download_unpacks_once_and_is_cached(bundle, base_dir, byte_tokenizer, monkeypatch):
    base = base_dir
    with _Server(zip_bundle(bundle)) as server:
        monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", server.url)
        path = ensure_eval_bundle()
        assert path == str(base / "eval_bundle")
        assert sorted(os.listdir(path)) == ["core.yaml", "eval_data", "eval_meta_data.csv"]
        assert (base / "eval_bundle.zip").exists()  # the zip stays, like upstream
        assert ensure_eval_bundle() == path
        assert server.requests == 1
        out = evaluate_core(FakeLM(), byte_tokenizer, "cpu")  # finds the bundle in the base dir
        assert out["results"] == pytest.approx(EXPECTED_ACC, abs=1e-6)
        assert server.requests == 1
    assert not [n for n in os.listdir(base) if n.startswith(".eval_bundle.")]  # no temp dirs left


def test_pre_placed_zip_needs_no_network(bundle, base_dir, monkeypatch):
    base_dir.mkdir()
    (base_dir / "eval_bundle.zip").write_bytes(zip_bundle(bundle))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"http://127.0.0.1:{free_port()}/eval_bundle.zip")
    assert os.path.isfile(os.path.join(ensure_eval_bundle(), "core.yaml"))


def test_unreachable_url_is_a_one_line_error(base_dir, monkeypatch):
    base_dir.mkdir()
    url = f"http://127.0.0.1:{free_port()}/eval_bundle.zip"
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url)
    with pytest.raises(EvalBundleError) as err:
        ensure_eval_bundle()
    assert url in str(err.value) and "\n" not in str(err.value)
    assert not (base_dir / "eval_bundle").exists() and not (base_dir / "eval_bundle.zip").exists()


def test_a_download_that_is_not_a_bundle_says_so(base_dir, monkeypatch):
    base_dir.mkdir()
    with _Server(b"<html>not a zip</html>") as server:
        monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", server.url)
        with pytest.raises(EvalBundleError, match="not a valid zip"):
            ensure_eval_bundle()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("something/else.txt", "hi")
    (base_dir / "eval_bundle.zip").write_bytes(buf.getvalue())
    with pytest.raises(EvalBundleError, match="no core.yaml"):
        ensure_eval_bundle()


# -----------------------------------------------------------------------------
# The head at the scored positions only (a real GPT) against the full-logits reference


def _greedy_lm_examples(model, prompt_ids, n_new):
    """Two language-modeling examples for `model`: its own greedy continuation (correct by construction)
    and the same with the last token changed (wrong), both in PreparedExample form."""
    greedy = list(model.generate(prompt_ids, n_new, temperature=0))
    right = prompt_ids + greedy
    wrong = right[:-1] + [(right[-1] + 1) % model.config.vocab_size]
    start = len(prompt_ids)
    return [core_eval.PreparedExample(0, [right], [start], [len(right)], -1),
            core_eval.PreparedExample(1, [wrong], [start], [len(wrong)], -1)]


@pytest.mark.usefixtures("one_thread")
def test_scored_positions_head_matches_the_full_logits_reference(bundle, byte_tokenizer, tiny_gpt):
    model = tiny_gpt(scrambled=True, sequence_len=128).eval()  # scrambled: decisive logits, no near ties
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), model.logits(model.hidden_states(ids)))  # forward is its two halves
    pad = byte_tokenizer.get_bos_token_id()
    for spec in load_task_specs(bundle):  # multiple_choice, schema and language_modeling
        data = load_task_data(bundle, spec)
        examples = prepare_examples(byte_tokenizer, data, list(range(len(data))), spec, max_seq_len=128)
        for batch in plan_batches(examples, batch_tokens=1024):
            fast = score_batch(model, batch, "cpu", pad)
            ref = score_batch(model, batch, "cpu", pad, full_logits=True)
            assert [ok for ok, _ in fast] == [ok for ok, _ in ref], spec.label
            for (_, fast_losses), (_, ref_losses) in zip(fast, ref):
                assert fast_losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), spec.label
    # greedy exact match is decided the same way on both paths, for a hit and for a miss
    prompt = [pad] + list(b"The count 7 reaches")
    lm = _greedy_lm_examples(model, prompt, 4)
    for full_logits in (False, True):
        assert [ok for ok, _ in score_batch(model, lm, "cpu", pad, full_logits=full_logits)] == [True, False]
    fast = evaluate_core(model, byte_tokenizer, "cpu", bundle_dir=bundle)
    ref = evaluate_core(model, byte_tokenizer, "cpu", bundle_dir=bundle, full_logits=True)
    assert fast["results"] == ref["results"] and fast["core_metric"] == ref["core_metric"]


@pytest.mark.usefixtures("one_thread")
def test_scored_positions_head_runs_lm_head_on_the_scored_rows_only(bundle, byte_tokenizer, tiny_gpt):
    model = tiny_gpt(sequence_len=512).eval()
    assert core_eval.scores_positions_only(model) and not core_eval.scores_positions_only(FakeLM())
    spec = load_task_specs(bundle)[1]  # arc_easy: 10-shot prompts, 4 options with a long shared prefix
    data = load_task_data(bundle, spec)
    examples = prepare_examples(byte_tokenizer, data, list(range(len(data))), spec)
    head_rows = []  # positions fed to lm_head, per call
    hook = model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[:-1].numel()))
    try:
        pad = byte_tokenizer.get_bos_token_id()
        score_batch(model, examples, "cpu", pad, full_logits=True)
        full_rows, head_rows[:] = list(head_rows), []
        score_batch(model, examples, "cpu", pad)
    finally:
        hook.remove()
    seqs = [s for ex in examples for s in ex.seqs]
    scored = sum(b - a for ex in examples for a, b in zip(ex.starts, ex.ends))
    assert full_rows == [len(seqs) * max(map(len, seqs))]  # every (row, position) of the padded batch
    assert head_rows == [scored] and 10 * scored < full_rows[0]


def test_core_and_chatcore_center_with_one_function_in_fractions(bundle, byte_tokenizer):
    from nanochat import chateval

    assert chateval.centered_accuracy is core_eval.centered_accuracy
    assert core_eval.centered_accuracy(0.625, 0.25) == 0.5
    with pytest.raises(ValueError, match="fraction"):
        core_eval.centered_accuracy(0.5, 25.0)  # a percent baseline is refused, not silently mis-scaled
    out = evaluate_core(FakeLM(), byte_tokenizer, "cpu", bundle_dir=bundle)
    for spec in load_task_specs(bundle):  # the bundle's baselines are percents, converted at the call
        want = core_eval.centered_accuracy(out["results"][spec.label], spec.random_baseline / 100)
        assert out["centered_results"][spec.label] == pytest.approx(want, abs=1e-12)
