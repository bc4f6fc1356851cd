"""A tiny CORE eval bundle in the real format and a fake model whose score on it is known exactly, for the
tests of nanochat/core_eval.py and scripts/base_eval.py.

    from core_bundle import EXPECTED_ACC, FakeLM, write_bundle
    bundle = write_bundle(str(tmp_path))  # <tmp_path>/eval_bundle: core.yaml, eval_meta_data.csv, eval_data/
    assert evaluate_core(FakeLM(), byte_tokenizer, "cpu", bundle_dir=bundle)["results"] == EXPECTED_ACC

The rows are read through a byte-level tokenizer (the test kit's `byte_tokenizer`), so every token is one
character and FakeLM's preferences decide each example by construction.
"""

import io
import json
import os
import zipfile

import torch
import torch.nn as nn

VOCAB = 256 + 9  # byte tokens + nanochat's special tokens; BOS = 256


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


# -----------------------------------------------------------------------------
# The tasks. Each: (label, category, type, shots, delimiter, baseline, rows, rule) where rule(row) says
# whether FakeLM gets the row right.

LOWER = ["sun", "tree", "river", "stone", "cloud", "grass"]
UPPER = ["RAIN", "SNOW", "WIND", "FIRE", "MOON", "STAR"]


def mc_rows(n, n_choices, n_correct, query):
    """n multiple-choice rows, one uppercase choice each; gold is that choice in the first n_correct."""
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
        ("copa", "commonsense_reasoning", "multiple_choice", 0, " ", 50.0, mc_rows(8, 2, 6, "Premise {i} so"),
         lambda r: r["choices"][r["gold"]].isupper()),
        ("arc_easy", "world_knowledge", "multiple_choice", 10, "\nAnswer: ", 25.0, mc_rows(12, 4, 9, "Question {i}: which one?"),
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


# -----------------------------------------------------------------------------
# The bundle on disk


def _yaml_str(s):
    return '"' + s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') + '"'


def write_bundle(root, tasks=None):
    """Write <root>/eval_bundle in the real layout (fixture_tasks() unless `tasks` is given); returns its path."""
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
    """The bundle directory as the bytes of eval_bundle.zip (one top-level eval_bundle/ folder, as served)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for dirpath, _, files in os.walk(bundle):
            for name in files:
                full = os.path.join(dirpath, name)
                zf.write(full, os.path.join("eval_bundle", os.path.relpath(full, bundle)))
    return buf.getvalue()
