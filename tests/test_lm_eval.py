"""lm-evaluation-harness on our model, offline: the `nanochat` adapter on a local multiple-choice task agrees item by
item with our CORE scoring, its rolling log-likelihood is our bits-per-byte evaluation's total, and lm-eval's own
`hf` model on the exported folder scores the task as the adapter does. Needs the `eval` extra (the `hf` comparison
also `export`); skipped without them, failing where NANOCHAT_REQUIRE_EXTRAS=1."""

import json
import math
import random
from dataclasses import asdict

import pytest
import torch

from conftest import require_extra
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.core_eval import TaskSpec, evaluate_task, prepare_examples, score_batch
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import compute_token_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "nanochat_local_mc"
WORDS = ["cat", "dog", "fox", "mat", "brown", "quick", "lazy", "jumps", "over", "the", "capital", "France", "Paris",
         "city", "square", "return", "numbers", "spaces", "runs", "emoji", "here", "see", "sat", "barked", "text"]


def make_items(tokenizer, n=48, seed=0):
    """n questions with 4 answer words of equal token count each: then our CORE rule (least mean loss over the
    tokens after the options' common prefix) and lm-eval's acc (largest summed log-likelihood) pick the same option."""
    by_len = {}
    for word in WORDS:
        by_len.setdefault(len(tokenizer.encode(" " + word)), []).append(word)
    groups = [words for words in by_len.values() if len(words) >= 4]
    rng = random.Random(seed)
    items = []
    for i in range(n):
        choices = rng.sample(rng.choice(groups), 4)
        query = f"Question {i}: which word goes with the {rng.choice(WORDS)} {rng.choice(WORDS)}? Answer:"
        items.append({"query": query, "choices": choices, "gold": rng.randrange(4)})
    return items


@pytest.fixture(scope="module")
def lm_eval(hf_offline):
    return require_extra("lm_eval", "eval")


@pytest.fixture(scope="module")
def local_task(tmp_path_factory, bpe_tokenizer, lm_eval):
    """A task folder (YAML over a JSON file, read by lm-eval's `json` dataset builder), its TaskManager, its items."""
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm_eval_task")
    items = make_items(bpe_tokenizer)
    (folder / "items.json").write_text("\n".join(json.dumps(item) for item in items))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {folder / 'items.json'}}}\n"
        f"  cache_dir: {folder / 'cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: query\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    higher_is_better: true\n")
    return folder, TaskManager(include_path=str(folder), include_defaults=False), items


def per_item_acc(results):
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [float(s["acc"]) for s in samples]


def run_task(lm_eval, model, task_manager, **kwargs):
    return lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=task_manager, log_samples=True,
                                   bootstrap_iters=0, **kwargs)


@pytest.fixture(scope="module")
def adapter(trained_tiny_gpt, bpe_tokenizer, lm_eval):
    from nanochat.lm_eval_adapter import NanochatLM

    return NanochatLM(model=trained_tiny_gpt, tokenizer=bpe_tokenizer, batch_size=8)


@pytest.fixture(scope="module")
def adapter_results(lm_eval, adapter, local_task):
    return run_task(lm_eval, adapter, local_task[1])


def test_adapter_accuracy_equals_core_scoring_item_by_item(adapter_results, local_task, trained_tiny_gpt, bpe_tokenizer):
    _, _, items = local_task
    spec = TaskSpec(label=TASK, task_type="multiple_choice", num_fewshot=0, delimiter=" ", dataset_uri="", random_baseline=25.0)
    ours = evaluate_task(trained_tiny_gpt, bpe_tokenizer, items, "cpu", spec).tolist()
    theirs = per_item_acc(adapter_results)
    assert len(theirs) == len(items) >= 40
    assert 0 < sum(ours) < len(items)  # a mix of right and wrong answers: the comparison can tell them apart
    assert theirs == ours
    assert adapter_results["results"][TASK]["acc,none"] == pytest.approx(sum(ours) / len(items))
    # Beyond the choice: lm-eval's summed log-likelihoods differ between options exactly as our per-token losses do
    # (the tokens the options share cancel out).
    examples = prepare_examples(bpe_tokenizer, items, range(len(items)), spec)
    scored = score_batch(trained_tiny_gpt, examples, "cpu", bpe_tokenizer.get_bos_token_id())
    samples = sorted(adapter_results["samples"][TASK], key=lambda s: s["doc_id"])
    for example, (_, losses), sample in zip(examples, scored, samples):
        logliks = [float(resp[0]) for resp in sample["filtered_resps"]]
        nats = [loss * (end - start) for loss, start, end in zip(losses, example.starts, example.ends)]
        assert [a - logliks[0] for a in logliks] == pytest.approx([nats[0] - b for b in nats], abs=1e-4)


def test_adapter_is_registered_as_nanochat(lm_eval, adapter):
    from lm_eval.api.registry import get_model

    assert get_model("nanochat") is type(adapter)


@pytest.mark.parametrize("max_length", [512, 40])
def test_loglikelihood_rolling_is_the_bpb_total(lm_eval, trained_tiny_gpt, bpe_tokenizer, max_length):
    """Our bpb evaluation of the BOS-prefixed text cut into rows of max_length, as nats, is lm-eval's total
    log-probability (40: several windows; each scores the tokens after the previous one's, the last one with a
    full row of context)."""
    from lm_eval.api.instance import Instance

    from nanochat.lm_eval_adapter import NanochatLM

    lm = NanochatLM(model=trained_tiny_gpt, tokenizer=bpe_tokenizer, batch_size=4, max_length=max_length)
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "def square(x):\n    return x ** 2\n"
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    stream = torch.tensor([bpe_tokenizer.get_bos_token_id()] + bpe_tokenizer.encode(text))
    rows = []
    for first in range(0, len(stream) - 1, max_length):  # targets stream[first + 1 : end + 1] in this row
        end = min(first + max_length, len(stream) - 1)
        start = max(end - max_length, 0)  # the last row reaches back for a full row of context
        y = stream[start + 1:end + 1].clone()
        y[:first - start] = -1  # targets an earlier row already scored
        rows.append((stream[start:end][None], y[None]))
    token_bytes = compute_token_bytes(bpe_tokenizer)
    bpb = evaluate_bpb(trained_tiny_gpt, rows, len(rows), token_bytes)
    nats = bpb * math.log(2) * token_bytes[stream[1:]].sum().item()
    assert (len(rows) > 1) == (max_length == 40)
    assert -total == pytest.approx(nats, rel=1e-5)


def test_generate_until_is_our_greedy_engine_cut_at_the_stop(lm_eval, trained_tiny_gpt, bpe_tokenizer):
    """Three requests in batches of two: each gets what our Engine gives it alone, cut before its stop string."""
    from lm_eval.api.instance import Instance

    from nanochat.lm_eval_adapter import NanochatLM

    lm = NanochatLM(model=trained_tiny_gpt, tokenizer=bpe_tokenizer, batch_size=2)
    engine = Engine(trained_tiny_gpt, bpe_tokenizer)
    requests, expected = [], []
    for i, context in enumerate(["The quick brown", "def square(x):", "Question: What is"]):
        prompt = lm.tok_encode(context)
        (row,), _ = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)
        full = bpe_tokenizer.decode(row[len(prompt):])
        stop = full.strip()[:3][-1] if i < 2 else "no such stop"  # a character the continuation does hold
        requests.append(Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 20}), i))
        expected.append(full.split(stop)[0])
    assert lm.generate_until(requests) == expected
    assert all(expected)


def test_chat_template_prompt_is_render_for_completion(adapter, bpe_tokenizer):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fox."}]
    prompt = adapter.apply_chat_template(history)
    expected = bpe_tokenizer.render_for_completion({"messages": history + [{"role": "assistant", "content": ""}]})
    assert adapter.tok_encode(prompt) == expected


def test_hf_model_on_the_export_scores_like_the_adapter(lm_eval, adapter, adapter_results, local_task, trained_tiny_gpt,
                                                         bpe_tokenizer, tmp_path):
    require_extra("transformers", "export")
    from nanochat.hf_export import export_folder

    out = export_folder(trained_tiny_gpt, bpe_tokenizer, tmp_path / "hf")
    results = run_task(lm_eval, "hf", local_task[1], batch_size=8, device="cpu",
                       model_args={"pretrained": str(out), "trust_remote_code": True, "dtype": "float32"})
    assert per_item_acc(results) == per_item_acc(adapter_results)
    ours, theirs = (sorted(r["samples"][TASK], key=lambda s: s["doc_id"]) for r in (adapter_results, results))
    for a, b in zip(ours, theirs):
        assert [float(r[0]) for r in b["filtered_resps"]] == pytest.approx([float(r[0]) for r in a["filtered_resps"]], abs=1e-4)
    assert results["results"][TASK]["acc,none"] == adapter_results["results"][TASK]["acc,none"]
    # With lm-eval's chat templating (and a system message), the folder's Jinja template and our render agree too.
    chat = dict(apply_chat_template=True, system_instruction="Answer with one word.", limit=12)
    ours = run_task(lm_eval, adapter, local_task[1], **chat)
    theirs = run_task(lm_eval, "hf", local_task[1], batch_size=8, device="cpu", **chat,
                      model_args={"pretrained": str(out), "trust_remote_code": True, "dtype": "float32"})
    ours, theirs = (sorted(r["samples"][TASK], key=lambda s: s["doc_id"]) for r in (ours, theirs))
    assert ours[0]["arguments"][0][0].startswith("<|bos|><|user_start|>Answer with one word.\n\nQuestion")
    for a, b in zip(ours, theirs):
        assert b["arguments"] == a["arguments"]
        assert [float(r[0]) for r in b["filtered_resps"]] == pytest.approx([float(r[0]) for r in a["filtered_resps"]], abs=1e-4)


def test_script_evaluates_a_checkpoint_and_writes_a_report_line(lm_eval, local_task, base_dir, bpe_tokenizer, trained_tiny_gpt):
    from scripts import lm_eval as script

    bpe_tokenizer.save(str(base_dir / "tokenizer"))
    torch.save(compute_token_bytes(bpe_tokenizer), base_dir / "tokenizer" / "token_bytes.pt")
    save_checkpoint(str(base_dir / "base_checkpoints" / "d4"), 3, trained_tiny_gpt.state_dict(), None,
                    {"step": 3, "model_config": asdict(trained_tiny_gpt.config)})
    results = script.main(["-i", "base", "--tasks", TASK, "--include-path", str(local_task[0]), "--limit", "8",
                           "--device-type", "cpu"])
    assert results["n-samples"][TASK]["effective"] == 8
    assert 0 <= results["results"][TASK]["acc,none"] <= 1
    report = (base_dir / "report" / "lm-eval-harness.md").read_text()
    assert TASK in report and "acc" in report
    # lm-eval's own loader builds the registered `nanochat` model from its model_args string.
    by_name = lm_eval.simple_evaluate(model="nanochat", model_args="source=base,model_tag=d4,step=3", tasks=[TASK],
                                      task_manager=local_task[1], limit=8, device="cpu", bootstrap_iters=0)
    assert by_name["results"][TASK]["acc,none"] == results["results"][TASK]["acc,none"]


@pytest.mark.slow  # lm-eval indexes its thousands of task YAMLs first: ~15 s here
def test_script_names_unknown_tasks_in_one_line(lm_eval, local_task, base_dir):
    from scripts import lm_eval as script

    with pytest.raises(SystemExit) as exc:
        script.main(["-i", "base", "--tasks", "no_such_task_xyz", "--include-path", str(local_task[0]), "--device-type", "cpu"])
    assert "no_such_task_xyz" in str(exc.value) and "\n" not in str(exc.value)


def test_script_without_the_extra_says_how_to_install(monkeypatch):
    import nanochat.lm_eval_adapter as adapter_module
    from scripts import lm_eval as script

    monkeypatch.setattr(adapter_module, "TemplateLM", object)  # what a core install (no `eval` extra) has
    with pytest.raises(SystemExit) as exc:
        script.main(["--tasks", "arc_easy"])
    assert "uv sync --extra eval" in str(exc.value) and "\n" not in str(exc.value)
