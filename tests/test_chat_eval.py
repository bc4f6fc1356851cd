"""Tests of nanochat/chateval.py and scripts/chat_eval.py.

The tasks are the real task classes reading fixture rows (upstream row formats) written into tmp_path;
the tokenizer is byte-level (no merges) with nanochat's nine special tokens; the model is an "oracle"
whose logits the test scripts per prompt, so every accuracy below is known exactly.
"""

import json
import math
import os
import sys
import types

import pytest
import torch

from nanochat import chateval
from nanochat.chateval import (BASELINES, CHATCORE_TASKS, centered_accuracy, chatcore, chatcore_cat, parse_task_names,
                               pass_at_k, run_categorical_eval, run_generative_eval, run_task_eval)
from nanochat.engine import Engine


@pytest.fixture
def tok(byte_tokenizer):
    """The kit's byte tokenizer (tests/conftest.py), under the short name every test here uses."""
    return byte_tokenizer


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# -----------------------------------------------------------------------------
# Fixture rows in the upstream formats

ARC_ROWS = [
    {"id": "q0", "question": "Which is a mammal?", "choices": {"text": ["Shark", "Whale", "Trout", "Eel"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "q1", "question": "What melts ice fastest?", "choices": {"text": ["Salt", "Sand", "Cold"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "q2", "question": "Longest prompt of the lot, to make padding matter: what does a plant need to grow well?",
     "choices": {"text": ["Dark", "Light", "Noise", "Plastic"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "q3", "question": "Numbered labels?", "choices": {"text": ["no", "yes", "maybe"], "label": ["1", "2", "3"]}, "answerKey": "2"},
    {"id": "q4", "question": "Sun is a?", "choices": {"text": ["Planet", "Star", "Moon", "Comet", "Rock"], "label": ["A", "B", "C", "D", "E"]}, "answerKey": "B"},
]
MMLU_ROWS = [
    {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "Capital of France?", "subject": "geography", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": 1},
    {"question": "H2O is?", "subject": "chemistry", "choices": ["Water", "Salt", "Gold", "Iron"], "answer": 0},
]
GSM8K_ROWS = [
    {"question": "Tom has 3 bags of 6 apples. How many apples?", "answer": "3 bags of 6 is <<3*6=18>>18 apples.\n#### 18"},
    {"question": "Ann buys 2 boxes of 9 pens. How many pens?", "answer": "2*9 = <<2*9=18>>18 pens.\n#### 18"},
    {"question": "A rope of 1,000 cm is cut in 4. How long is a piece?", "answer": "<<1000/4=250>>250 cm.\n#### 250"},
]
HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0", "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n",
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n",
     "canonical_solution": "    return 2 * x\n", "entry_point": "double",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
]
WORDS = ["strawberry", "banana", "committee", "cat", "mississippi", "letter"]


def write_task_dir(root):
    """All task datasets where tasks.common looks for local copies ($NANOCHAT_TASKS_DIR layout)."""
    write_jsonl(root / "allenai--ai2_arc" / "ARC-Easy" / "test.jsonl", ARC_ROWS)
    write_jsonl(root / "allenai--ai2_arc" / "ARC-Challenge" / "test.jsonl", ARC_ROWS[:3])
    write_jsonl(root / "cais--mmlu" / "all" / "test.jsonl", MMLU_ROWS)
    write_jsonl(root / "openai--gsm8k" / "main" / "test.jsonl", GSM8K_ROWS)
    write_jsonl(root / "openai--openai_humaneval" / "openai_humaneval" / "test.jsonl", HUMANEVAL_ROWS)


@pytest.fixture
def env(base_dir, tmp_path, monkeypatch):
    """NANOCHAT_BASE_DIR (tmp_path/base) and NANOCHAT_TASKS_DIR in tmp_path, with every fixture dataset and
    the word list."""
    base = base_dir
    base.mkdir()
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path / "tasks"))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    write_task_dir(tmp_path / "tasks")
    (base / "words_alpha.txt").write_text("\n".join(WORDS) + "\n")
    return tmp_path


# -----------------------------------------------------------------------------
# The oracle model


class OracleModel:
    """Logits scripted per prompt.

    answers: {prompt ids tuple: completion ids}. Without a cache (categorical scoring) every row's
    logits at its last prompt position favour completion[0]; all other positions (including the
    padding) favour `wrong`, and `decoy` (not an answer letter) beats everything everywhere, so only
    a scorer that looks at the right position and restricts to the letters gets the answer.
    With a cache (generation) it plays completion token by token, like a greedy model would.
    """

    def __init__(self, tokenizer, answers, wrong, decoy, seq_len=4096):
        self.config = types.SimpleNamespace(sequence_len=seq_len, vocab_size=tokenizer.get_vocab_size(),
                                            n_layer=1, n_head=1, n_kv_head=1, n_embd=4)
        self.vocab = tokenizer.get_vocab_size()
        self.bos = tokenizer.get_bos_token_id()
        self.end = tokenizer.encode_special("<|assistant_end|>")
        self.answers, self.wrong, self.decoy = answers, wrong, decoy
        self.script, self.prompt_len = None, None
        self.forward_batches = []

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, ids, targets=None, kv_cache=None):
        return self.forward(ids, targets, kv_cache)

    def forward(self, ids, targets=None, kv_cache=None):
        B, T = ids.shape
        self.forward_batches.append(B)
        logits = torch.zeros(B, T, self.vocab)
        if kv_cache is None:
            logits[:, :, self.wrong] = 5.0
            logits[:, :, self.decoy] = 50.0
            for row in range(B):
                prompt = ids[row].tolist()
                while prompt[-1] == self.bos:  # strip the right padding
                    prompt.pop()
                logits[row, len(prompt) - 1, self.wrong] = 0.0
                logits[row, len(prompt) - 1, self.answers[tuple(prompt)][0]] = 10.0
            return logits
        pos = kv_cache.get_pos()
        if pos == 0:
            self.script, self.prompt_len = self.answers[tuple(ids[0].tolist())], T
        k = pos + T - self.prompt_len
        logits[:, -1, self.script[k] if k < len(self.script) else self.end] = 100.0
        kv_cache.advance(T)
        return logits


def special(tok, name):
    return tok.encode_special(f"<|{name}|>")


def tool_completion(tok, expr, output, tail):
    """The tokens a model emits (and the engine forces) for: tool call `expr` -> `output`, then `tail`."""
    return ([special(tok, "python_start")] + tok.encode(expr) + [special(tok, "python_end"), special(tok, "output_start")]
            + tok.encode(output) + [special(tok, "output_end")] + tok.encode(tail) + [special(tok, "assistant_end")])


def text_completion(tok, text):
    return tok.encode(text) + [special(tok, "assistant_end")]


def oracle(tok, answers):
    return OracleModel(tok, answers, wrong=tok.encode("C")[0], decoy=tok.encode("Z")[0])


def mc_answers(tok, task, right):
    """Prompt -> letter: the reference answer for indices in `right`, a wrong letter for the others."""
    answers = {}
    for i in range(len(task)):
        conv = task[i]
        ref = conv["messages"][-1]["content"]
        letter = ref if i in right else next(l for l in conv["letters"] if l != ref)
        answers[tuple(tok.render_for_completion(conv))] = tok.encode(letter)
    return answers


# -----------------------------------------------------------------------------
# Categorical


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_categorical_exact_accuracy(env, tok, batch_size):
    from tasks.arc import ARC

    task = ARC("ARC-Easy", "test")
    assert len(task) == 5
    model = oracle(tok, mc_answers(tok, task, right={0, 2, 3}))
    assert run_categorical_eval(task, tok, model, batch_size=batch_size) == 3 / 5
    assert model.forward_batches == [min(batch_size, 5 - b) for b in range(0, 5, batch_size)]


def test_categorical_numeric_labels_and_mmlu(env, tok):
    from tasks.arc import ARC
    from tasks.mmlu import MMLU

    arc = ARC("ARC-Easy", "test")
    numbered = next(i for i in range(len(arc)) if arc[i]["letters"] == ["1", "2", "3"])
    assert run_categorical_eval(arc, tok, oracle(tok, mc_answers(tok, arc, right={numbered})), batch_size=4) == 1 / 5
    mmlu = MMLU("all", "test")
    assert run_categorical_eval(mmlu, tok, oracle(tok, mc_answers(tok, mmlu, right={0, 1, 2})), batch_size=2) == 1.0
    assert run_categorical_eval(mmlu, tok, oracle(tok, mc_answers(tok, mmlu, right=set())), batch_size=2) == 0.0


def test_categorical_max_problems(env, tok):
    from tasks.arc import ARC

    task = ARC("ARC-Easy", "test")
    model = oracle(tok, mc_answers(tok, task, right={0, 1}))
    assert run_categorical_eval(task, tok, model, batch_size=3, max_problems=2) == 1.0
    assert sum(model.forward_batches) == 2
    with pytest.raises(ValueError, match="max_problems"):
        run_categorical_eval(task, tok, model, batch_size=3, max_problems=0)


def test_categorical_letters_must_be_single_tokens(env, tok):
    from tasks.common import Task

    class TwoTokenLetters(Task):
        eval_type = "categorical"

        def num_examples(self):
            return 1

        def get_example(self, index):
            return {"messages": [{"role": "user", "content": "pick"}, {"role": "assistant", "content": "AB"}], "letters": ["AB", "CD"]}

        def evaluate(self, conversation, response):
            return response == "AB"

    task = TwoTokenLetters()
    model = oracle(tok, {tuple(tok.render_for_completion(task[0])): tok.encode("A")})
    with pytest.raises(ValueError, match="exactly one token"):
        run_categorical_eval(task, tok, model, batch_size=1)


# -----------------------------------------------------------------------------
# Generative


def test_gsm8k_generative_with_calculator_and_exact_match(env, tok):
    """Decision: answers compare as exact strings, so "#### 18.00" fails against "18".

    We keep upstream's rule so our GSM8K/ChatCORE numbers stay comparable with upstream's; the
    calculator prints Python's str() (3*6 -> "18", 36/2 -> "18.0"), and the model learns the
    training data's integer style.
    """
    from tasks.gsm8k import GSM8K

    task = GSM8K("main", "test")
    by_question = {task[i]["messages"][0]["content"]: task[i] for i in range(len(task))}
    plan = {  # question -> completion (tool results are forced by the engine, not scripted as sampled)
        GSM8K_ROWS[0]["question"]: tool_completion(tok, "3*6", "18", "18 apples.\n#### 18"),
        GSM8K_ROWS[1]["question"]: tool_completion(tok, "2*9", "18", "18 pens.\n#### 18.00"),
        GSM8K_ROWS[2]["question"]: tool_completion(tok, "1,000/4", "250.0", " cm.\n#### 250"),
    }
    answers = {tuple(tok.render_for_completion(by_question[q])): c for q, c in plan.items()}
    engine = Engine(oracle(tok, answers), tok)
    assert run_generative_eval(task, tok, engine, num_samples=1, max_new_tokens=64, temperature=0.0) == 2 / 3
    # max_new_tokens too small to reach "####": nothing passes.
    assert run_generative_eval(task, tok, engine, num_samples=1, max_new_tokens=8, temperature=0.0) == 0.0


def test_spellingbee_generative(env, tok):
    from tasks.spellingbee import SpellingBee

    task = SpellingBee(size=4, split="test")
    answers = {}
    for i in range(4):
        parts = task[i]["messages"][-1]["content"]
        count = parts[3]["text"]
        tail = parts[4]["text"] if i != 1 else parts[4]["text"].replace(f"#### {count}", f"#### {int(count) + 1}")
        answers[tuple(tok.render_for_completion(task[i]))] = tool_completion(tok, parts[2]["text"], count, tail)
    engine = Engine(oracle(tok, answers), tok)
    assert run_generative_eval(task, tok, engine, max_new_tokens=200) == 3 / 4


def test_humaneval_generative_runs_the_tests(env, tok):
    from tasks.humaneval import HumanEval

    task = HumanEval()
    answers = {}
    for i in range(len(task)):
        conv = task[i]
        body = "    return a + b\n" if conv["entry_point"] == "add" else "    return x + 3\n"
        code = conv["messages"][0]["content"] + body
        answers[tuple(tok.render_for_completion(conv))] = text_completion(tok, f"```python\n{code}```")
    engine = Engine(oracle(tok, answers), tok)
    assert run_generative_eval(task, tok, engine, max_new_tokens=300) == 1 / 2


def test_each_task_gets_a_budget_its_answers_fit_and_cut_replies_are_counted(env, tok, caplog):
    # The oracle answers SpellingBee with the task's own reference answers (spelled out, counted, checked with the
    # calculator): hundreds of tokens here. A fixed budget of 96 cut every one before its "#### n".
    from tasks.spellingbee import SpellingBee

    task = SpellingBee(size=4, split="test")
    answers, longest = {}, 0
    for i in range(len(task)):
        prompt = tok.render_for_completion(task[i])
        whole, _ = tok.render_conversation(task[i], max_tokens=1 << 20)
        answers[tuple(prompt)] = whole[len(prompt) - 1:]  # the reply, after <|assistant_start|>, with its end token
        longest = max(longest, len(answers[tuple(prompt)]))
    engine = Engine(oracle(tok, answers), tok)
    assert chateval.reply_budget(task, tok, len(task)) == math.ceil(1.5 * longest) and longest > 96
    details = {}
    assert run_generative_eval(task, tok, engine, details=details) == 1.0
    assert details == {"max_new_tokens": math.ceil(1.5 * longest), "replies": 4, "cut": 0}
    with caplog.at_level("WARNING", logger="nanochat"):
        assert run_generative_eval(task, tok, engine, max_new_tokens=96, details=details) == 0.0
    assert details == {"max_new_tokens": 96, "replies": 4, "cut": 4}
    assert "SpellingBee: 4 of 4 replies were cut at the 96-token limit before they ended" in caplog.text


class FakeEngine:
    """generate_batch that returns scripted completions per (prompt, sample); records its kwargs."""

    def __init__(self, tok, completions, model):
        self.tok, self.completions, self.model, self.calls = tok, completions, model, []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append(dict(kwargs, num_samples=num_samples))
        texts = self.completions[tuple(tokens)]
        assert len(texts) == num_samples
        rows = [list(tokens) + self.tok.encode(t) for t in texts]
        return rows, [[0] * len(tokens) + [1] * (len(r) - len(tokens)) for r in rows]


def test_pass_at_k(env, tok):
    from tasks.gsm8k import GSM8K

    task = GSM8K("main", "test")
    refs = [task[i]["messages"][-1]["content"][-1]["text"].split("#### ")[-1] for i in range(3)]
    samples = [[f"#### {refs[0]}", "#### 0"], ["#### 0", f"#### {refs[1]}"], ["#### 0", "no answer"]]
    completions = {tuple(tok.render_for_completion(task[i])): samples[i] for i in range(3)}
    model = oracle(tok, {})
    engine = FakeEngine(tok, completions, model)
    acc = run_generative_eval(task, tok, engine, num_samples=2, max_new_tokens=7, temperature=0.9, top_k=5)
    assert acc == 2 / 3
    assert engine.calls[0] == {"num_samples": 2, "max_tokens": 7, "temperature": 0.9, "top_k": 5, "seed": 42}
    outcomes = [[bool(task.evaluate(task[i], s)) for s in samples[i]] for i in range(3)]
    assert pass_at_k(outcomes, 1) == 1 / 3 and pass_at_k(outcomes, 2) == 2 / 3
    with pytest.raises(ValueError):
        pass_at_k(outcomes, 3)
    with pytest.raises(ValueError):
        pass_at_k([], 1)


def test_run_task_eval_dispatches_on_eval_type(env, tok):
    from tasks.arc import ARC

    task = ARC("ARC-Easy", "test")
    model = oracle(tok, mc_answers(tok, task, right={1}))
    assert run_task_eval(task, model, tok, engine=None, batch_size=2) == 1 / 5
    training_only = types.SimpleNamespace(eval_type=None)  # e.g. SmolTalk
    with pytest.raises(ValueError, match="eval_type"):
        run_task_eval(training_only, model, tok, engine=None, name="SmolTalk")


# -----------------------------------------------------------------------------
# ChatCORE


def test_chatcore_centering():
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.0, 0.25) == pytest.approx(-1 / 3)
    # Upstream's Oct 2025 report (5 tasks, before SpellingBee): ChatCORE 0.0985 from these (rounded) accuracies.
    oct25 = {"ARC-Easy": 0.3969, "ARC-Challenge": 0.3029, "MMLU": 0.3159, "GSM8K": 0.0531, "HumanEval": 0.0854}
    five = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
    assert chatcore(oct25, tasks=five) == pytest.approx(0.0985, abs=1e-4)  # the report rounded its inputs
    assert chatcore(oct25) is None  # our ChatCORE also needs SpellingBee
    six = dict(oct25, SpellingBee=0.5)
    assert chatcore(six) == pytest.approx((chatcore(oct25, tasks=five) * 5 + 0.5) / 6)
    assert chatcore_cat(oct25) == pytest.approx(sum((oct25[t] - 0.25) / 0.75 for t in five[:3]) / 3)
    assert CHATCORE_TASKS == ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
    assert BASELINES == {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}


def test_parse_task_names():
    assert parse_task_names(None) == list(CHATCORE_TASKS)
    assert parse_task_names("GSM8K|ARC-Easy") == ["GSM8K", "ARC-Easy"]
    with pytest.raises(ValueError, match="unknown task"):
        parse_task_names("GSM8K|gsm8k")
    with pytest.raises(ValueError, match="twice"):
        parse_task_names("MMLU|MMLU")


# -----------------------------------------------------------------------------
# Several ranks (gloo on CPU): the split covers every problem once and the counts add up


def _rank_worker(rank, world_size, tok):
    # The tasks read $NANOCHAT_TASKS_DIR, which the ranks inherit from the test's env fixture.
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K

    arc = ARC("ARC-Easy", "test")
    model = oracle(tok, mc_answers(tok, arc, right={0, 2, 3}))
    cat = run_categorical_eval(arc, tok, model, batch_size=2)
    gsm = GSM8K("main", "test")
    answers = {tuple(tok.render_for_completion(gsm[i])): text_completion(tok, "#### 18") for i in range(len(gsm))}
    gen = run_generative_eval(gsm, tok, Engine(oracle(tok, answers), tok), max_new_tokens=16)
    return {"cat": cat, "gen": gen, "batches": model.forward_batches}


@pytest.mark.slow
def test_two_ranks_match_one(env, tok, run_on_ranks):
    results = run_on_ranks(_rank_worker, tok)
    for r in results:
        assert r["cat"] == 3 / 5 and r["gen"] == 2 / 3
    # 5 problems in batches of 2: batches 0 and 2 on rank 0, batch 1 on rank 1.
    assert results[0]["batches"] == [2, 1] and results[1]["batches"] == [2]


# -----------------------------------------------------------------------------
# The script


def build_full_oracle(tok):
    """Answers for every task chat_eval builds from the fixtures: known right/wrong per task."""
    answers = {}
    for name in CHATCORE_TASKS:
        task = chateval.build_task(name)
        if task.eval_type == "categorical":
            answers.update(mc_answers(tok, task, right=set(range(len(task))) if name != "MMLU" else {0}))
            continue
        for i in range(min(len(task), 4)):
            conv = task[i]
            prompt = tuple(tok.render_for_completion(conv))
            if name == "HumanEval":
                answers[prompt] = text_completion(tok, "```python\n" + conv["messages"][-1]["content"] + "```")
            else:  # GSM8K, SpellingBee: the reference's own final text, so all pass
                answers[prompt] = text_completion(tok, conv["messages"][-1]["content"][-1]["text"])
    return answers


def test_evaluate_chatcore_with_caps(env, tok):
    model = oracle(tok, build_full_oracle(tok))
    out = chateval.evaluate_chatcore(model, tok, Engine(model, tok), batch_size=3, max_categorical=2, max_generative=1)
    assert out["accuracies"] == {"ARC-Easy": 1.0, "ARC-Challenge": 1.0, "MMLU": 0.5, "GSM8K": 1.0, "HumanEval": 1.0,
                                 "SpellingBee": 1.0}
    assert out["chatcore"] == pytest.approx((5 + (0.5 - 0.25) / 0.75) / 6)
    assert out["chatcore_cat"] == pytest.approx((2 + (0.5 - 0.25) / 0.75) / 3)
    # Prebuilt tasks, a subset: no ChatCORE, but the multiple-choice score is there.
    subset = {name: chateval.build_task(name) for name in ("ARC-Easy", "ARC-Challenge", "MMLU")}
    out = chateval.evaluate_chatcore(model, tok, Engine(model, tok), tasks=subset)
    assert out["chatcore"] is None and out["chatcore_cat"] == pytest.approx((2 + (1 / 3 - 0.25) / 0.75) / 3)


def install_fake_loader(monkeypatch, model, tok, calls):
    """Stand in for nanochat.checkpoint_manager.load_model (its checkpoint format is tested elsewhere)."""
    fake = types.ModuleType("nanochat.checkpoint_manager")

    def load_model(source, device, phase, model_tag=None, step=None):
        calls.append((source, str(device), phase, model_tag, step))
        return model, tok, {"step": 7}

    fake.load_model = load_model
    monkeypatch.setitem(sys.modules, "nanochat.checkpoint_manager", fake)


def test_cli_all_tasks_writes_report_with_chatcore(env, tok, monkeypatch):
    from scripts import chat_eval

    calls = []
    install_fake_loader(monkeypatch, oracle(tok, build_full_oracle(tok)), tok, calls)
    out = chat_eval.main(["-i", "sft", "-x", "4", "-b", "2", "-g", "d1", "-s", "7", "--device-type", "cpu"])
    assert calls == [("sft", "cpu", "eval", "d1", 7)]
    # ARC (both) all right; MMLU 1 of 3; GSM8K, HumanEval, SpellingBee all right (first 4 problems).
    expected = {"ARC-Easy": 1.0, "ARC-Challenge": 1.0, "MMLU": 1 / 3, "GSM8K": 1.0, "HumanEval": 1.0, "SpellingBee": 1.0}
    assert out["accuracies"] == expected
    assert out["chatcore"] == pytest.approx((3 + (1 / 3 - 0.25) / 0.75 + 2) / 6)
    report = (env / "base" / "report" / "chat-evaluation-sft.md").read_text()
    assert report.startswith("## Chat evaluation sft\n")
    assert "- source: sft\n" in report and "- max_problems: 4\n" in report and "- task_name: None\n" in report
    assert "- MMLU: 0.3333\n" in report and "- SpellingBee: 1.0000\n" in report
    assert "- SpellingBee replies cut at the limit: 0/4 (limit " in report
    assert f"- ChatCORE metric: {out['chatcore']:.4f}\n" in report


def test_the_report_names_the_device_used_when_it_was_autodetected(env, tok, monkeypatch):
    from scripts import chat_eval

    install_fake_loader(monkeypatch, oracle(tok, build_full_oracle(tok)), tok, [])
    monkeypatch.setattr(chat_eval, "autodetect_device_type", lambda: "cpu")
    chat_eval.main(["-i", "mid", "-a", "GSM8K", "-x", "2"])  # no --device-type
    report = (env / "base" / "report" / "chat-evaluation-mid.md").read_text()
    assert "- device_type: cpu\n" in report


def test_cli_subset_has_no_chatcore(env, tok, monkeypatch):
    from scripts import chat_eval

    install_fake_loader(monkeypatch, oracle(tok, build_full_oracle(tok)), tok, [])
    out = chat_eval.main(["-i", "rl", "-a", "GSM8K", "-x", "2", "--device-type", "cpu"])
    assert out == {"accuracies": {"GSM8K": 1.0}, "chatcore": None}
    report = (env / "base" / "report" / "chat-evaluation-rl.md").read_text()
    assert "- GSM8K: 1.0000\n" in report and "ChatCORE" not in report


@pytest.mark.parametrize("argv, message", [
    (["-i", "sft", "-a", "GSM9K"], "unknown task"),
    (["-i", "sft", "-t", "-1"], "--temperature"),
    (["-i", "sft", "-n", "0"], "--num-samples"),
    (["-i", "sft", "-x", "0"], "--max-problems"),
    (["-i", "sft", "-k", "-5"], "--top-k"),
])
def test_cli_rejects_bad_flags(env, argv, message):
    from scripts import chat_eval

    with pytest.raises(SystemExit, match=message):
        chat_eval.main(argv)


def test_cli_source_is_required_and_checked(env, capsys):
    from scripts import chat_eval

    for argv in ([], ["-i", "base"]):
        with pytest.raises(SystemExit):
            chat_eval.main(argv)
    assert "--source" in capsys.readouterr().err


def test_cli_end_to_end_on_a_saved_checkpoint(env, tok, tiny_gpt):
    """The real chain: checkpoint files -> load_model -> GPT + tokenizer -> every task -> report."""
    from dataclasses import asdict

    from nanochat.checkpoint_manager import get_checkpoints_dir, save_checkpoint
    from scripts import chat_eval

    tok.save(str(env / "base" / "tokenizer"))
    # compute_dtype=None: the dtype a training script would build it in on this machine.
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), sequence_len=512, compute_dtype=None)
    save_checkpoint(os.path.join(get_checkpoints_dir("sft"), "d2"), 5, model.state_dict(), None,
                    {"step": 5, "model_config": asdict(model.config)})

    argv = ["-i", "sft", "-x", "2", "-m", "6", "-b", "4", "--device-type", "cpu"]
    first = chat_eval.main(argv)
    assert list(first["accuracies"]) == list(CHATCORE_TASKS)
    # The same model evaluated in memory, 2 problems per task, as -x 2 -m 6 -b 4 ask.
    direct = {name: chateval.run_task_eval(chateval.build_task(name), model, tok, Engine(model, tok), batch_size=4,
                                           max_new_tokens=6, max_problems=2, name=name) for name in CHATCORE_TASKS}
    assert first["accuracies"] == direct
    # ChatCORE: each accuracy centred on random guessing (1/4 for the three 4-way multiple-choice tasks, 0 for
    # the generative ones) and scaled to 1 for a perfect score, then averaged over the six tasks.
    acc = first["accuracies"]
    by_hand = (sum((acc[name] - 0.25) / 0.75 for name in ("ARC-Easy", "ARC-Challenge", "MMLU"))
               + acc["GSM8K"] + acc["HumanEval"] + acc["SpellingBee"]) / 6
    assert first["chatcore"] == pytest.approx(by_hand)
    assert chat_eval.main(argv) == first  # greedy and seeded: the same numbers again
    report = (env / "base" / "report" / "chat-evaluation-sft.md").read_text()
    assert "- ChatCORE metric: " in report and "- HumanEval: " in report
