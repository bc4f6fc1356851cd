"""Chat data that needs no download: the shipped identity conversations, the offline word list, the
synthetic arithmetic task, and gsm8k_or_synthetic / fallbacks_used that pick and record the stand-ins.

Sockets refuse to connect and the base dir is a fresh tmp folder in every test.
"""

import json
import logging
import os
import re
import socket

import pytest

from nanochat.chateval import CHATCORE_TASKS, build_task, parse_task_names
from nanochat.engine import use_calculator
from tasks import common, gsm8k, spellingbee
from tasks.arithmetic import TEMPLATES, SyntheticArithmetic
from tasks.common import DatasetUnavailableError, TaskMixture, fallbacks_used, gsm8k_or_synthetic
from tasks.customjson import IDENTITY_CONVERSATIONS_URL, SHIPPED_IDENTITY_PATH, CustomJSON, identity_conversations_path
from tasks.gsm8k import GSM8K, extract_answer
from tasks.spellingbee import SimpleSpelling, SpellingBee

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tasks")


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, base_dir):
    """No network, a fresh base dir, and an empty fallback registry (it is process-wide by design)."""
    def no_network(*args, **kwargs):
        raise AssertionError("an offline task test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(common, "_fallbacks", {})
    return base_dir


def warnings_matching(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# -----------------------------------------------------------------------------
# Identity conversations


def shipped_conversations():
    with open(SHIPPED_IDENTITY_PATH, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_shipped_identity_file_is_valid():
    conversations = shipped_conversations()
    assert 40 <= len(conversations) <= 60
    for messages in conversations:
        assert isinstance(messages, list) and 2 <= len(messages) <= 6
        assert len(messages) % 2 == 0  # ends with the assistant: nothing unanswered to train on
        for i, message in enumerate(messages):
            assert set(message) == {"role", "content"}
            assert message["role"] == ("user" if i % 2 == 0 else "assistant")
            assert isinstance(message["content"], str) and message["content"].strip()
            assert message["content"].isascii()
    # It is about this model: many conversations name it.
    assert sum(any("nanochat" in m["content"] for m in c) for c in conversations) > len(conversations) / 3
    assert {len(m) for m in conversations} == {2, 4, 6}
    # The loader agrees with the format rules.
    assert len(CustomJSON(SHIPPED_IDENTITY_PATH)) == len(conversations)


def test_identity_fallback_when_the_base_dir_has_none(base_dir, caplog):
    with caplog.at_level(logging.WARNING):
        task = CustomJSON(identity_conversations_path())
        again = CustomJSON(identity_conversations_path())
    assert len(task) == len(again) == len(shipped_conversations())
    assert task[0]["messages"] == shipped_conversations()[0]
    announced = warnings_matching(caplog, "shipped in nanochat/data")
    assert len(announced) == 1
    assert "curl -L -o" in announced[0].getMessage() and IDENTITY_CONVERSATIONS_URL in announced[0].getMessage()
    assert len(fallbacks_used()) == 1 and fallbacks_used()[0].startswith("identity conversations:")
    assert "\n" not in fallbacks_used()[0]
    assert not os.path.exists(identity_conversations_path())  # the stand-in is read in place, not copied


def test_identity_file_in_the_base_dir_wins(base_dir):
    base_dir.mkdir(parents=True, exist_ok=True)
    own = [{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "my own bot"}]
    (base_dir / "identity_conversations.jsonl").write_text(json.dumps(own) + "\n")
    task = CustomJSON(identity_conversations_path())
    assert len(task) == 1 and task[0]["messages"] == own
    assert fallbacks_used() == []


def test_other_missing_files_stay_empty(tmp_path):
    assert len(CustomJSON(tmp_path / "elsewhere" / "identity_conversations.jsonl")) == 0
    assert fallbacks_used() == []


# -----------------------------------------------------------------------------
# Word list from the offline corpus


@pytest.fixture
def no_word_list_download(monkeypatch):
    import nanochat.common

    def fail(url, filename, **kwargs):
        raise RuntimeError(f"could not download {url} (ConnectionError: offline)")

    monkeypatch.setattr(nanochat.common, "download_file_with_lock", fail)
    monkeypatch.setattr(spellingbee, "OFFLINE_MAX_CHARS", 200_000)  # the first few stdlib files: fast


def test_word_list_falls_back_to_the_offline_corpus(no_word_list_download, base_dir, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING):
        bee = SpellingBee(size=20, split="test")
        SimpleSpelling(size=5)
    words = bee.words
    assert len(words) > 500
    assert all(re.fullmatch(r"[a-z]{2,20}", w) and re.search("[aeiouy]", w) for w in words)
    assert len(set(words)) == len(words)
    assert list(words) != sorted(words)  # shuffled after sorting
    assert list(words) == spellingbee.words_from_offline_corpus()  # deterministic
    cached = base_dir / spellingbee.OFFLINE_WORD_LIST_FILENAME
    assert cached.read_text().split("\n")[:-1] == list(words)
    # Announced once for both tasks; the report line says how many words.
    assert len(warnings_matching(caplog, "word list unavailable offline")) == 1
    assert fallbacks_used() == [f"SpellingBee/SimpleSpelling word list unavailable offline: {len(words):,} words "
                                "from the offline corpus used instead"]
    # The examples keep their format (and their train/test seeds), scored like GSM8K.
    example = bee[3]
    answer = example["messages"][1]["content"][-1]["text"]
    assert bee.evaluate(example, answer) == 1
    # A second process finds the cache and does not read the corpus again.
    monkeypatch.setattr(spellingbee, "words_from_offline_corpus", lambda *a: pytest.fail("rebuilt the cached list"))
    assert spellingbee.load_words() == words


def test_downloaded_word_list_is_preferred(base_dir):
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / "words_alpha.txt").write_text("cat\ndog\n")
    assert SpellingBee(size=2).words == ("cat", "dog")
    assert fallbacks_used() == []


# -----------------------------------------------------------------------------
# Synthetic arithmetic


def assistant_parts(conversation):
    return conversation["messages"][1]["content"]


def test_synthetic_is_deterministic_per_seed():
    first = [SyntheticArithmetic(30, "train")[i] for i in range(30)]
    assert first == [SyntheticArithmetic(30, "train", seed=0)[i] for i in range(30)]
    other = [SyntheticArithmetic(30, "train", seed=1)[i] for i in range(30)]
    assert sum(a == b for a, b in zip(first, other)) < 3


def test_synthetic_train_and_test_are_disjoint():
    def questions(task):
        return {task[i]["messages"][0]["content"] for i in range(len(task))}

    test = questions(SyntheticArithmetic(300, "test"))
    assert len(test) > 280  # varied, not a handful of repeats
    for seed in (0, 1):
        assert not test & questions(SyntheticArithmetic(1500, "train", seed=seed))


def test_synthetic_has_varied_templates_and_small_numbers():
    task = SyntheticArithmetic(400, "train")
    steps, answers, openings = set(), [], set()
    for i in range(len(task)):
        parts = assistant_parts(task[i])
        steps.add(sum(p["type"] == "python" for p in parts))
        answers.append(int(extract_answer(parts[-1]["text"])))
        openings.add(" ".join(task[i]["messages"][0]["content"].split()[1:3]))
    assert steps == {1, 2, 3}
    assert all(0 <= a < 1000 for a in answers)
    assert len(openings) > 30
    assert len(TEMPLATES) >= 12


@pytest.mark.parametrize("split", ["train", "test"])
def test_synthetic_tool_calls_are_what_the_calculator_computes(split):
    task = SyntheticArithmetic(150, split, seed=3)
    for i in range(len(task)):
        conversation = task[i]
        assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
        parts = assistant_parts(conversation)
        types = [p["type"] for p in parts]
        # GSM8K's shape: text, then (python, python_output, text) per calculation.
        assert types[0] == "text" and types[-1] == "text"
        assert types[1:] == ["python", "python_output", "text"] * ((len(types) - 1) // 3)
        for call, output in zip(parts[1::3], parts[2::3]):
            assert str(use_calculator(call["text"])) == output["text"], call["text"]
        final = parts[-1]["text"]
        assert re.search(r"\n#### \d+$", final)
        assert extract_answer(final) == parts[-2]["text"]  # the answer is the last calculation's result


def test_synthetic_evaluate_and_reward():
    task = SyntheticArithmetic(5, "test")
    assert task.eval_type == "generative"
    conversation = task[0]
    reference = "".join(p["text"] for p in assistant_parts(conversation) if p["type"] != "python")
    answer = extract_answer(reference)
    assert task.evaluate(conversation, reference) == 1
    assert task.evaluate(conversation, f"so it is {answer}\n#### {answer}") == 1
    assert task.evaluate(conversation, f"#### {int(answer) + 1}") == 0
    assert task.evaluate(conversation, answer) == 0  # no '#### ' marker
    assert task.reward(conversation, reference) == 1.0 and task.reward(conversation, "#### -1") == 0.0


def test_synthetic_renders_with_tool_masks(byte_tokenizer):
    tok = byte_tokenizer
    conversation = SyntheticArithmetic(1, "train")[0]
    ids, mask = tok.render_conversation(conversation)
    sp = {name: tok.encode_special(f"<|{name}|>") for name in
          ("bos", "user_start", "user_end", "assistant_start", "assistant_end", "python_start", "python_end",
           "output_start", "output_end")}
    # Rebuild the expected (ids, mask) part by part.
    want = [(sp["bos"], 0), (sp["user_start"], 0)]
    want += [(t, 0) for t in tok.encode(conversation["messages"][0]["content"])] + [(sp["user_end"], 0)]
    want.append((sp["assistant_start"], 0))
    for part in assistant_parts(conversation):
        body = tok.encode(part["text"])
        if part["type"] == "text":
            want += [(t, 1) for t in body]
        elif part["type"] == "python":
            want += [(sp["python_start"], 1)] + [(t, 1) for t in body] + [(sp["python_end"], 1)]
        else:
            want += [(sp["output_start"], 0)] + [(t, 0) for t in body] + [(sp["output_end"], 0)]
    want.append((sp["assistant_end"], 1))
    assert list(zip(ids, mask)) == want
    assert ids.count(sp["python_start"]) == ids.count(sp["output_start"]) >= 1
    prompt = tok.render_for_completion(conversation)
    assert prompt[-1] == sp["assistant_start"] and sp["python_start"] not in prompt


def test_synthetic_mixes_with_other_tasks():
    mixture = TaskMixture([SyntheticArithmetic(20, "train"), CustomJSON(SHIPPED_IDENTITY_PATH)])
    assert len(mixture) == 20 + len(shipped_conversations())
    assert SyntheticArithmetic(100, "test", start=10, stop=30)[0] == SyntheticArithmetic(100, "test")[10]
    with pytest.raises(ValueError, match="split"):
        SyntheticArithmetic(10, "validation")


def test_synthetic_is_in_the_chat_eval_registry():
    assert parse_task_names("SyntheticArithmetic|GSM8K") == ["SyntheticArithmetic", "GSM8K"]
    assert "SyntheticArithmetic" not in parse_task_names(None)  # not part of the default run nor ChatCORE
    assert "SyntheticArithmetic" not in CHATCORE_TASKS
    task = build_task("SyntheticArithmetic")
    assert isinstance(task, SyntheticArithmetic) and task.split == "test" and len(task) == 1319


# -----------------------------------------------------------------------------
# gsm8k_or_synthetic and the fallback registry


def test_gsm8k_or_synthetic_falls_back_and_records_it(monkeypatch, caplog):
    def unavailable(path, name=None, split="train", **kwargs):
        raise DatasetUnavailableError(f"Dataset {path} is not available: offline")

    monkeypatch.setattr(gsm8k, "load_hf_dataset", unavailable)
    with caplog.at_level(logging.WARNING):
        train = gsm8k_or_synthetic("train")
        gsm8k_or_synthetic("train")
        val = gsm8k_or_synthetic("test", stop=420)
    assert isinstance(train, SyntheticArithmetic) and len(train) == 7473 and train.split == "train"
    assert isinstance(val, SyntheticArithmetic) and len(val) == 420 and val.split == "test"
    assert len(gsm8k_or_synthetic("train", size=50, seed=2)) == 50
    announced = warnings_matching(caplog, "synthetic arithmetic problems")
    assert len(announced) == 2 and "offline" in announced[0].getMessage()
    assert fallbacks_used() == [
        "GSM8K main/train unavailable offline: 7,473 synthetic arithmetic problems (tasks/arithmetic.py) used instead",
        "GSM8K main/test unavailable offline: 1,319 synthetic arithmetic problems (tasks/arithmetic.py) used instead",
    ]


def test_gsm8k_or_synthetic_prefers_the_real_data(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", FIXTURES)
    task = gsm8k_or_synthetic("test")
    assert isinstance(task, GSM8K) and len(task) > 0
    assert fallbacks_used() == []


def test_fallbacks_are_noted_once_in_order():
    assert common.note_fallback("b", "second thing") is True
    assert common.note_fallback("a", "first thing") is True
    assert common.note_fallback("b", "second thing again") is False
    assert fallbacks_used() == ["second thing", "first thing"]


# -----------------------------------------------------------------------------
# The hub is never waited on when it can't be used


@pytest.fixture
def fresh_hub_state(tmp_path, monkeypatch):
    """No local task files, an empty HuggingFace cache, and the once-per-process hub probe forgotten."""
    import datasets  # imported before the variables below are set: the case that used to hit the network

    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path / "tasks"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(common, "_hub_reachable", None)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)


def _refuse_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(common, "_check_hub", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def test_offline_variables_set_after_datasets_is_imported_still_count(fresh_hub_state, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _refuse_network(monkeypatch)
    with pytest.raises(DatasetUnavailableError, match="cais/mmlu"):
        common.load_hf_dataset("cais/mmlu", "all", split="test")


def test_an_unreachable_hub_is_probed_once_and_then_skipped(fresh_hub_state, monkeypatch, caplog):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr(common, "_check_hub", lambda: probes.append(1) or False)
    with caplog.at_level(logging.WARNING, logger="tasks.common"):
        for path, name in (("cais/mmlu", "all"), ("allenai/ai2_arc", "ARC-Easy")):
            with pytest.raises(DatasetUnavailableError, match=path):
                common.load_hf_dataset(path, name, split="test")
    assert probes == [1] and common._hub_reachable is False  # one probe, and no hub call (the socket is blocked)
    assert len(warnings_matching(caplog, "can't be reached")) == 1


def test_the_hub_probe_is_one_connection_with_a_timeout(monkeypatch):
    calls = []

    class Connection:
        def close(self):
            calls.append("closed")

    def connect(address, timeout):
        calls.append((address, timeout))
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    assert common._check_hub(timeout=2.0) and calls == [(("mirror.example", 8080), 2.0), "closed"]

    def refuse(address, timeout):
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert common._check_hub() is False
