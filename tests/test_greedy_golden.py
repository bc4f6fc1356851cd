"""Greedy replies of one fixed checkpoint (the micro chat model) through every decoding path: Engine.generate_batch,
scripts/chat_cli, the OpenAI-compatible server (one request at a time, streamed, and 16 at once) and RL rollouts.
Stored in tests/golden/greedy_paths.json, so a refactor of the decode code must leave every token where it was.
After a deliberate model or format change, regenerate (and say why in the commit):
    NANOCHAT_UPDATE_GOLDEN=1 uv run pytest tests/test_greedy_golden.py
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from conftest import CHAT_CONTEXT, _make_tiny_gpt
from nanochat.common import atomic_write
from nanochat.engine import Engine
from scripts import chat_cli

GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "golden", "greedy_paths.json")
QUESTIONS = ["hello", "What is 2+2?", "Tell me a story about a cat.", "x", "Why is the sky blue? Answer briefly.",
             "abc def ghi", "1 2 3 4 5", "ok"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _chat_model():
    """The model the chat_model_dir fixture saves (same seed and sizes), built in memory."""
    return _make_tiny_gpt(sequence_len=CHAT_CONTEXT, scrambled=True).eval()


class _Quiz:
    """RL task: the QUESTIONS; every answer earns 1 (the rollouts' tokens are what is compared)."""

    def __len__(self):
        return len(QUESTIONS)

    def __getitem__(self, index):
        return {"messages": [{"role": "user", "content": QUESTIONS[index]}, {"role": "assistant", "content": "-"}]}

    def reward(self, conversation, response):
        return 1.0


def _engine_and_rl(tokenizer):
    got = {}
    engine = Engine(_chat_model(), tokenizer)
    for i, question in enumerate(QUESTIONS):
        prompt = tokenizer.render_for_completion(_Quiz()[i])
        results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=24, temperature=0.0)
        got[f"engine {i}"] = [results, masks]
    from nanochat.rl import RolloutStream

    stream = RolloutStream(_Quiz(), tokenizer, engine, examples_per_step=4, num_samples=2, device_batch_size=2,
                           max_new_tokens=20, temperature=0.0, top_k=0)
    for n in range(4):
        inputs, (targets, advantages), _ = next(stream)
        got[f"rl {n}"] = [inputs.tolist(), targets.tolist()]
    return got


def _cli(capsys):
    got = {}
    for i, question in enumerate(QUESTIONS[:3]):
        assert chat_cli.main(["--device-type", "cpu", "-t", "0", "-m", "24", "-p", question]) == 0
        got[f"cli {i}"] = capsys.readouterr().out
    return got


def _server(url):
    got = {}
    with openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120) as client:
        def ask(question, stream=False):
            kwargs = dict(model="nanochat", messages=[{"role": "user", "content": question}], max_tokens=24,
                          temperature=0.0)
            if stream:
                chunks = client.chat.completions.create(stream=True, **kwargs)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return client.chat.completions.create(**kwargs).choices[0].message.content

        for i, question in enumerate(QUESTIONS):
            got[f"server {i}"] = ask(question)
        got["server streamed"] = [ask(question, stream=True) for question in QUESTIONS[:3]]
        with ThreadPoolExecutor(16) as pool:  # 16 requests at once: one running batch, rows joining and leaving
            got["server 16 at once"] = list(pool.map(ask, [QUESTIONS[i % len(QUESTIONS)] for i in range(16)]))
    return got


def test_greedy_replies_are_the_stored_ones_on_every_path(byte_tokenizer, chat_model_dir, serve_chat, monkeypatch,
                                                          capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(chat_model_dir))
    with torch.random.fork_rng(devices=[]):
        got = _engine_and_rl(byte_tokenizer)
    got.update(_cli(capsys))
    with serve_chat() as served:
        got.update(_server(served.url))
    # The same request gives the same reply alone, streamed or in a batch of 16.
    assert got["server streamed"] == [got[f"server {i}"] for i in range(3)]
    assert got["server 16 at once"] == [got[f"server {i % len(QUESTIONS)}"] for i in range(16)]
    if os.environ.get("NANOCHAT_UPDATE_GOLDEN") == "1":
        atomic_write(GOLDEN_PATH, json.dumps(got) + "\n")
    with open(GOLDEN_PATH) as f:
        expected = json.load(f)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], f"{key}: greedy tokens changed; if deliberate, regenerate (see the docstring)"
