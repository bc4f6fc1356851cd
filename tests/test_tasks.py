"""Task datasets (tasks/): views, mixtures, loaders, and each task's exact conversations and scoring.

Rows come from tests/fixtures/tasks (written in each dataset's real upstream row format) through
NANOCHAT_TASKS_DIR; the HuggingFace libraries are forced offline and sockets refuse to connect.
"""

import json
import os
import random
import socket

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from tasks import common
from tasks.arc import ARC
from tasks.common import DatasetUnavailableError, Task, TaskMixture, TaskSequence, load_hf_dataset, render_mc
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, extract_answer, solution_to_parts
from tasks.humaneval import HumanEval, extract_imports, extract_program
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import TEST_RANDOM_SEED_OFFSET, USER_MSG_TEMPLATES, SimpleSpelling, SpellingBee

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tasks")
MC_TAIL = "\nRespond only with the letter of the correct answer."


@pytest.fixture(autouse=True)
def hermetic(base_dir, monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("NANOCHAT_TASKS_DIR", FIXTURES)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("a task test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def fixture_rows(relpath):
    with open(os.path.join(FIXTURES, relpath), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def find(task, predicate):
    matches = [task[i] for i in range(len(task)) if predicate(task[i])]
    assert len(matches) == 1
    return matches[0]


# -----------------------------------------------------------------------------
# Task views and mixtures


class Toy(Task):
    def __init__(self, n, tag="t", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"i": index, "tag": self.tag}


def test_full_view():
    task = Toy(10)
    assert len(task) == 10 and task[0]["i"] == 0 and task[9]["i"] == 9 and task[-1]["i"] == 9
    with pytest.raises(IndexError):
        task[10]
    with pytest.raises(TypeError):
        task["0"]
    with pytest.raises(TypeError):
        task[1.0]
    assert task[np.int64(3)]["i"] == 3


def test_slicing():
    task = Toy(10, start=5, stop=10)
    assert len(task) == 5 and task[0]["i"] == 5
    task = Toy(10, start=0, stop=10, step=3)
    assert len(task) == 4 and [task[i]["i"] for i in range(4)] == [0, 3, 6, 9]
    assert len(Toy(10, start=9, step=5)) == 1
    assert len(Toy(5, stop=420)) == 5  # a stop past the end means "to the end"


@pytest.mark.parametrize("kwargs", [dict(start=-1), dict(start=5, stop=4), dict(step=0)])
def test_bad_slices_are_rejected(kwargs):
    with pytest.raises(ValueError):
        Toy(10, **kwargs)


def test_training_only_task_has_no_evaluate():
    with pytest.raises(TypeError, match="training-only"):
        Toy(3).evaluate({}, "x")


def test_mixture_is_a_deterministic_interleaved_shuffle():
    a, b = Toy(3, "a"), Toy(5, "b")
    mix = TaskMixture([a, b])
    seen = [(mix[i]["tag"], mix[i]["i"]) for i in range(len(mix))]
    assert len(mix) == 8
    assert sorted(seen) == [("a", i) for i in range(3)] + [("b", i) for i in range(5)]
    assert seen == [(ex["tag"], ex["i"]) for ex in (TaskMixture([a, b])[i] for i in range(8))]
    assert seen != [("a", i) for i in range(3)] + [("b", i) for i in range(5)]


def test_mixture_order_matches_shuffling_the_pair_list():
    # Upstream shuffles the list of (task, local index) pairs with random.Random(42); we shuffle indices.
    tasks = [Toy(7, "a"), Toy(3, "b", start=1), Toy(11, "c", step=2)]
    pairs = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
    random.Random(42).shuffle(pairs)
    mix = TaskMixture(tasks)
    assert [mix[k] for k in range(len(mix))] == [tasks[t][i] for t, i in pairs]


def test_mixture_oversampling_and_slicing():
    a = Toy(3)
    assert len(TaskMixture([a, a])) == 6
    mix = TaskMixture([a, Toy(5, "b")], stop=4)
    assert len(mix) == 4 and mix[3] == TaskMixture([a, Toy(5, "b")])[3]


def test_sequence_is_plain_concatenation():
    seq = TaskSequence([Toy(2, "a"), Toy(4, "b", start=1)])
    assert [(seq[i]["tag"], seq[i]["i"]) for i in range(len(seq))] == [("a", 0), ("a", 1), ("b", 1), ("b", 2), ("b", 3)]


def test_render_mc_exact_format():
    assert render_mc("What is 1+1?", ("A", "B"), ("1", "2")) == (
        "Multiple Choice question: What is 1+1?\n- 1=A\n- 2=B\n" + MC_TAIL)
    with pytest.raises(ValueError):
        render_mc("q", ("A",), ("1", "2"))


# -----------------------------------------------------------------------------
# Loading


def test_shuffle_is_numpy_default_rng_permutation(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"x": list(range(100)), "y": [str(i) for i in range(100)]}), path)
    plain = load_hf_dataset("fake/rows", split="train", data_files=str(path), shuffle_seed=None)
    assert len(plain) == 100 and plain[7] == {"x": 7, "y": "7"}
    shuffled = load_hf_dataset("fake/rows", split="train", data_files=str(path))
    assert [shuffled[i]["x"] for i in range(100)] == np.random.default_rng(42).permutation(100).tolist()
    assert plain[7] == {"x": 7, "y": "7"}


def test_local_parquet_shards_in_the_tasks_dir(tmp_path, monkeypatch):
    rows = pajson.read_json(os.path.join(FIXTURES, "openai--gsm8k/main/test.jsonl"))
    shard_dir = tmp_path / "openai--gsm8k" / "main" / "test"
    shard_dir.mkdir(parents=True)
    pq.write_table(rows.slice(0, 2), shard_dir / "00000.parquet")
    pq.write_table(rows.slice(2), shard_dir / "00001.parquet")
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path))
    ds = load_hf_dataset("openai/gsm8k", "main", "test", shuffle_seed=None)
    assert [ds[i]["question"] for i in range(len(ds))] == [r["question"] for r in fixture_rows("openai--gsm8k/main/test.jsonl")]


def test_default_tasks_dir_is_under_the_base_dir(monkeypatch, base_dir):
    monkeypatch.delenv("NANOCHAT_TASKS_DIR")
    assert common.local_tasks_dir() == os.path.join(str(base_dir), "task_data")


def test_missing_dataset_names_it_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path / "empty"))
    with pytest.raises(DatasetUnavailableError) as info:
        ARC("ARC-Challenge", "test")
    message = str(info.value)
    assert "allenai/ai2_arc" in message and "ARC-Challenge" in message and "split test" in message
    assert "datasets.load_dataset('allenai/ai2_arc', 'ARC-Challenge', split='test')" in message
    assert os.path.join(str(tmp_path / "empty"), "allenai--ai2_arc", "ARC-Challenge", "test") in message
    assert "python -m tasks.common --only allenai/ai2_arc" in message


def test_missing_data_files_are_reported(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="data_files not found"):
        load_hf_dataset("openai/gsm8k", "main", "test", data_files=str(tmp_path / "nope.parquet"))


def test_export_writes_the_local_layout(tmp_path, monkeypatch):
    import datasets
    from datasets.table import InMemoryTable

    table = pajson.read_json(os.path.join(FIXTURES, "openai--gsm8k/main/train.jsonl"))
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset(InMemoryTable(table))

    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "exported"
    common.main(["--out-dir", str(out), "--only", "openai/gsm8k"])
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert (out / "openai--gsm8k" / "main" / "train.parquet").is_file()
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(out))
    assert GSM8K("main", "train")[0]["messages"][0]["content"].startswith("Sam reads 12 pages")
    with pytest.raises(SystemExit, match="known"):
        common.main(["--out-dir", str(out), "--only", "nope/nope"])


# -----------------------------------------------------------------------------
# ARC and MMLU


def test_arc_renders_the_exact_conversation():
    task = ARC("ARC-Easy", "test")
    assert task.eval_type == "categorical" and len(task) == 4
    conv = find(task, lambda c: "mass of a rock" in c["messages"][0]["content"])
    assert conv == {
        "messages": [
            {"role": "user", "content": "Multiple Choice question: Which tool is best for measuring the mass of a rock?\n"
                                        "- a ruler=A\n- a balance=B\n- a thermometer=C\n- a stopwatch=D\n" + MC_TAIL},
            {"role": "assistant", "content": "B"},
        ],
        "letters": ["A", "B", "C", "D"],
    }
    assert task.evaluate(conv, "B") is True and task.evaluate(conv, "A") is False
    with pytest.raises(ValueError):
        task.evaluate(conv, "Z")


def test_arc_numeric_labels_and_order():
    task = ARC("ARC-Easy", "test")
    conv = find(task, lambda c: "renewable" in c["messages"][0]["content"])
    assert conv["letters"] == ["1", "2", "3", "4"] and "- wind=2\n" in conv["messages"][0]["content"]
    assert task.evaluate(conv, "2")
    rows = fixture_rows("allenai--ai2_arc/ARC-Easy/test.jsonl")
    perm = np.random.default_rng(42).permutation(len(rows))
    assert [task[i]["messages"][1]["content"] for i in range(len(task))] == [rows[p]["answerKey"] for p in perm]
    assert len(ARC("ARC-Challenge", "train")) == 2
    with pytest.raises(ValueError, match="subset"):
        ARC("ARC-Medium", "test")


def test_mmlu_renders_the_exact_conversation():
    task = MMLU("all", "test")
    conv = find(task, lambda c: "Z_6" in c["messages"][0]["content"])
    assert conv == {
        "messages": [
            {"role": "user", "content": "Multiple Choice question: What is the order of the group Z_6?\n"
                                        "- 2=A\n- 3=B\n- 6=C\n- 12=D\n" + MC_TAIL},
            {"role": "assistant", "content": "C"},
        ],
        "subject": "abstract_algebra",
        "letters": ("A", "B", "C", "D"),
    }
    assert task.evaluate(conv, "C") and not task.evaluate(conv, "A")
    with pytest.raises(ValueError):
        task.evaluate(conv, "E")


def test_mmlu_auxiliary_train_both_layouts_agree():
    new, old = MMLU("all", "auxiliary_train"), MMLU("auxiliary_train", "train")
    assert len(new) == len(old) == 2
    assert [new[i] for i in range(2)] == [old[i] for i in range(2)]
    conv = find(new, lambda c: "sun rises" in c["messages"][0]["content"])
    assert conv["messages"][1]["content"] == "C" and conv["subject"] == ""


@pytest.mark.parametrize("subset,split", [("all", "train"), ("auxiliary_train", "test"), ("physics", "test")])
def test_mmlu_bad_subset_or_split(subset, split):
    with pytest.raises(ValueError, match="MMLU"):
        MMLU(subset, split)


# -----------------------------------------------------------------------------
# GSM8K


def test_gsm8k_calculator_annotations_become_tool_calls():
    assert solution_to_parts("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10") == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\n#### 10"},
    ]
    # The last '=' splits; no '=' gives an empty output; empty text pieces are kept.
    assert solution_to_parts("<<a=b=3>>x<<7>>") == [
        {"type": "text", "text": ""}, {"type": "python", "text": "a=b"}, {"type": "python_output", "text": "3"},
        {"type": "text", "text": "x"}, {"type": "python", "text": "7"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": ""},
    ]


def test_gsm8k_renders_the_exact_conversation():
    task = GSM8K("main", "test")
    assert task.eval_type == "generative" and len(task) == 3
    conv = find(task, lambda c: c["messages"][0]["content"].startswith("Mia buys"))
    assert conv == {"messages": [
        {"role": "user", "content": "Mia buys 4 packs of pens with 6 pens each. She gives away 5 pens. "
                                    "How many pens does she have left?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Mia buys 4*6 = "},
            {"type": "python", "text": "4*6"},
            {"type": "python_output", "text": "24"},
            {"type": "text", "text": "24 pens.\nAfter giving some away she has 24-5 = "},
            {"type": "python", "text": "24-5"},
            {"type": "python_output", "text": "19"},
            {"type": "text", "text": "19 pens.\n#### 19"},
        ]},
    ]}


@pytest.mark.parametrize("text,expected", [
    ("so #### 19", "19"), ("#### 3,600", "3600"), ("#### -5", "-5"), ("#### 2.50 and #### 7", "2.50"),
    ("the answer is 19", None), ("####19", None),
])
def test_gsm8k_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_evaluate_and_reward():
    task = GSM8K("main", "test")
    conv = find(task, lambda c: "baker" in c["messages"][0]["content"])
    assert task.evaluate(conv, "He earns 3600.\n#### 3,600") == 1
    assert task.evaluate(conv, "#### 3600") == 1
    assert task.evaluate(conv, "#### 3600.0") == 0  # exact string match, as upstream
    assert task.evaluate(conv, "I think 3600") == 0
    assert task.reward(conv, "#### 3600") == 1.0 and task.reward(conv, "#### 1") == 0.0
    assert isinstance(task.reward(conv, "#### 3600"), float)
    with pytest.raises(TypeError):
        task.evaluate(conv, ["#### 3600"])


# -----------------------------------------------------------------------------
# HumanEval


def test_humaneval_conversation_and_helpers():
    task = HumanEval()
    assert task.eval_type == "generative" and len(task) == 2
    row = next(r for r in fixture_rows("openai--openai_humaneval/openai_humaneval/test.jsonl") if r["entry_point"] == "scaled_sum")
    conv = find(task, lambda c: c["entry_point"] == "scaled_sum")
    assert conv == {
        "messages": [{"role": "user", "content": row["prompt"]},
                     {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}],
        "entry_point": "scaled_sum",
        "test": row["test"],
    }
    assert extract_imports(row["prompt"]) == "from typing import List\nimport math"
    assert extract_imports("# header\n\nimport os\n  from x import y\ndef f(): pass\nimport late") == "import os\nfrom x import y"
    assert extract_program("Sure:\n```python\ndef f():\n    return 1\n```\nmore\n```\nx\n```") == "def f():\n    return 1"
    assert extract_program("```  \nprint(1)\n```") == "print(1)"
    assert extract_program("  def g(): pass  ") == "def g(): pass"


def test_humaneval_runs_the_tests_in_the_sandbox():
    task = HumanEval()
    conv = find(task, lambda c: c["entry_point"] == "scaled_sum")
    good = "```python\ndef scaled_sum(values, factor):\n    return math.floor(sum(values) * factor)\n```"
    wrong = "```python\ndef scaled_sum(values, factor):\n    return sum(values) * factor\n```"
    assert task.build_program(conv, good).startswith("from typing import List\nimport math\n\ndef scaled_sum(")
    assert task.build_program(conv, good).endswith("\ncheck(scaled_sum)")
    assert task.evaluate(conv, good) is True
    assert task.evaluate(conv, wrong) is False
    quick = HumanEval(timeout=1.0)
    assert quick.evaluate(conv, "while True:\n    pass") is False
    # The reference solution passes when sent back as a completion.
    assert task.evaluate(conv, conv["messages"][1]["content"])


# -----------------------------------------------------------------------------
# SmolTalk


def test_smoltalk_keeps_system_message_and_validates():
    task = SmolTalk("test")
    assert len(task) == 3 and task.eval_type is None
    conv = find(task, lambda c: c["messages"][0]["role"] == "system")
    assert conv == {"messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name a primary color."},
        {"role": "assistant", "content": "Red."},
    ]}
    multi = find(task, lambda c: len(c["messages"]) == 4)
    assert [m["role"] for m in multi["messages"]] == ["user", "assistant", "user", "assistant"]


def test_smoltalk_bad_rows_are_rejected(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"content": "hi", "role": "assistant"}, {"content": "yo", "role": "user"}],
                               "source": "x"}) + "\n")
    task = SmolTalk("test", data_files=str(bad))
    with pytest.raises(ValueError, match="message 0 is from 'assistant'"):
        task[0]


# -----------------------------------------------------------------------------
# SpellingBee and SimpleSpelling


@pytest.fixture
def words(base_dir):
    """A small word list placed where the downloader would put it, so nothing is fetched."""
    word_list = ["strawberry", "banana", "committee", "a", "mississippi", "rhythm"]
    base_dir.mkdir(exist_ok=True)
    (base_dir / "words_alpha.txt").write_text("\r\n".join(word_list) + "\r\n")
    return word_list


def reference_spelling_bee(words, seed):
    """The RNG call order of upstream's generator, step by step."""
    rng = random.Random(seed)
    word = rng.choice(words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    template = rng.choice(USER_MSG_TEMPLATES)
    if rng.random() < 0.3:
        template = template.lower()
    lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
    msg = template.replace("{letter}", lq + letter + lq).replace("{word}", wq + word + wq)
    if rng.random() < 0.5:
        msg += "?"
    return word, letter, msg


def test_spellingbee_templates_are_complete():
    assert len(USER_MSG_TEMPLATES) == 51
    assert USER_MSG_TEMPLATES[0] == "How many {letter} are in the word {word}"
    assert USER_MSG_TEMPLATES[-1] == "{word}に{letter}が何回出てくる"
    assert all("{letter}" in t and "{word}" in t for t in USER_MSG_TEMPLATES)


def test_spellingbee_exact_example(words):
    task = SpellingBee(size=20, split="train")
    assert task.eval_type == "generative" and len(task) == 20
    for index in range(20):
        word, letter, msg = reference_spelling_bee(words, index)
        conv = task[index]
        assert conv["messages"][0] == {"role": "user", "content": msg}
        parts = conv["messages"][1]["content"]
        count = word.count(letter)
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        assert parts[1]["text"] == "\n\nLet me double check this using Python:\n\n"
        assert parts[2]["text"] == f"'{word}'.count('{letter}')"
        assert parts[3]["text"] == str(count)
        assert parts[4]["text"] == f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"
        assert parts[0]["text"].endswith(f"\nThis gives us {count}.")
    # One walk written out in full.
    conv = next(task[i] for i in range(20) if "'rhythm'.count('h')" == task[i]["messages"][1]["content"][2]["text"])
    assert conv["messages"][1]["content"][0]["text"] == (
        "We are asked to find the number 'h' in the word 'rhythm'. Let me try a manual approach first.\n\n"
        "First spell the word out:\nrhythm:r,h,y,t,h,m\n\nThen count the occurrences of 'h':\n"
        "1:r\n2:h hit! count=1\n3:y\n4:t\n5:h hit! count=2\n6:m\n\nThis gives us 2.")


def test_spellingbee_test_split_uses_offset_seeds(words):
    test = SpellingBee(size=5, split="test")
    for index in range(5):
        assert test[index]["messages"][0]["content"] == reference_spelling_bee(words, TEST_RANDOM_SEED_OFFSET + index)[2]
    assert SpellingBee(size=5, split="test")[3] == test[3]


def test_spellingbee_evaluate_and_reward(words):
    task = SpellingBee(size=3, split="test")
    conv = task[0]
    count = conv["messages"][1]["content"][3]["text"]
    assert task.evaluate(conv, f"blah\n\n#### {count}") == 1
    assert task.evaluate(conv, f"#### {int(count) + 1}") == 0
    assert task.reward(conv, f"#### {count}") == 1.0


def test_simple_spelling_format(words):
    task = SimpleSpelling(size=10, split="train")
    shuffled = list(words)
    random.Random(42).shuffle(shuffled)
    for index in range(10):
        word = random.Random(index).choice(shuffled)
        assert task[index] == {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                                            {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}
    with pytest.raises(ValueError, match="split"):
        SimpleSpelling(size=10, split="val")


def test_explicit_word_list_path(tmp_path):
    path = tmp_path / "mywords.txt"
    path.write_text("zebra\n")
    conv = SimpleSpelling(size=1, word_list_path=path)[0]
    assert conv["messages"][1]["content"] == "zebra:z,e,b,r,a"


# -----------------------------------------------------------------------------
# CustomJSON


def test_customjson_loads_identity_conversations():
    task = CustomJSON(os.path.join(FIXTURES, "identity_conversations.jsonl"))
    assert len(task) == 2
    assert task[1]["messages"][2] == {"role": "user", "content": "cool, are you open source?"}
    assert TaskMixture([task, task]).num_examples() == 4


def test_customjson_missing_file_is_empty_with_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="nanochat"):
        task = CustomJSON(tmp_path / "identity_conversations.jsonl")
    assert len(task) == 0
    assert "curl -L -o" in caplog.text and "identity_conversations.jsonl" in caplog.text


@pytest.mark.parametrize("line,problem", [
    ('{"role": "user", "content": "hi"}', "JSON array"),
    ('[{"role": "user", "content": "hi"}]', "at least 2"),
    ('[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]', "expected 'user'"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]', "string"),
    ('[{"role": "user"}, {"role": "assistant", "content": "x"}]', "'role' and 'content'"),
    ("[not json", "not valid JSON"),
])
def test_customjson_bad_lines_name_the_line(tmp_path, line, problem):
    path = tmp_path / "conv.jsonl"
    good = json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=problem) as info:
        CustomJSON(path)
    assert f"{path}:3" in str(info.value)


def test_fixtures_dir_is_untouched():
    # Loading must not write caches or indices next to the fixtures.
    ARC("ARC-Easy", "test")
    names = {os.path.relpath(os.path.join(d, f), FIXTURES) for d, _, fs in os.walk(FIXTURES) for f in fs}
    assert all(n.endswith(".jsonl") for n in names), names


# -----------------------------------------------------------------------------
# One implementation per task kind: the shared pieces of tasks/common.py can't drift apart per task


def _task_classes():
    import tasks.arithmetic  # noqa: F401  every task module imported, so every subclass exists
    import tasks.mixtures  # noqa: F401
    found, todo = [], [Task]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return {cls for cls in found if cls.__module__.startswith("tasks.")}


def test_every_categorical_task_renders_and_scores_through_the_one_mc_kind():
    categorical = {cls for cls in _task_classes() if cls.eval_type == "categorical"}
    assert {ARC, MMLU} <= categorical
    for cls in categorical - {common.MultipleChoiceTask}:
        assert issubclass(cls, common.MultipleChoiceTask)
        assert not {"get_example", "evaluate"} & set(vars(cls)), f"{cls.__name__} renders or scores on its own"
    for task in (ARC("ARC-Easy", "test"), MMLU("all", "test")):
        for i in range(len(task)):
            question, letters, choices, answer, _ = task.mc_row(task.ds[i], i)
            assert task[i]["messages"][0]["content"] == render_mc(question, letters, choices)


def test_every_final_answer_task_scores_through_the_one_grader(words):
    from tasks.arithmetic import SyntheticArithmetic

    graded = [GSM8K("main", "test"), SyntheticArithmetic(3, "test"), SpellingBee(size=3, split="test")]
    for task in graded:
        assert isinstance(task, common.FinalAnswerTask) and "evaluate" not in vars(type(task))  # no own scorer
        conv = task[0]
        answer = extract_answer(conv["messages"][-1]["content"][-1]["text"])
        assert task.evaluate(conv, f"so\n#### {answer}") == 1 and task.reward(conv, "#### -7") == 0.0
    assert {cls for cls in _task_classes() if issubclass(cls, common.FinalAnswerTask)} >= {type(t) for t in graded}


def test_smoltalk_and_customjson_check_conversations_alike(tmp_path):
    bad = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    (tmp_path / "smol.jsonl").write_text(json.dumps({"messages": bad}) + "\n")
    (tmp_path / "custom.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as smol:
        SmolTalk("test", data_files=str(tmp_path / "smol.jsonl"))[0]
    with pytest.raises(ValueError) as custom:
        CustomJSON(tmp_path / "custom.jsonl")
    assert str(smol.value).split(": ", 1)[1] == str(custom.value).split(": ", 1)[1] == \
        "message 1 is from 'user', expected 'assistant'"
    # A system message opens a SmolTalk conversation, never an identity one.
    system = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    common.validate_messages(system, "x", system_ok=True)
    with pytest.raises(ValueError, match="message 0 is from 'system'"):
        common.validate_messages(system, "x")


def test_every_exported_dataset_is_one_its_task_accepts(monkeypatch):
    from tasks.humaneval import HumanEval

    builders = {"allenai/ai2_arc": ARC, "cais/mmlu": MMLU, "openai/gsm8k": GSM8K,
                "openai/openai_humaneval": lambda subset, split: HumanEval(),
                "HuggingFaceTB/smol-smoltalk": lambda subset, split: SmolTalk(split)}
    asked = []
    for module in ("arc", "mmlu", "gsm8k", "humaneval", "smoltalk"):
        monkeypatch.setattr(f"tasks.{module}.load_hf_dataset", lambda path, name, split, **kw: asked.append((path, name, split)) or [])
    for path, subset, split in common.KNOWN_DATASETS:
        builders[path](subset, split)
    assert asked == common.KNOWN_DATASETS
