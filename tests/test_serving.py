"""nanochat/serving.py and the replica pool of nanochat/server.py: request parsing, prompts (against the training
renderer), context trimming, streaming text (UTF-8, tool calls, stop strings), top-p, and freeing a replica."""

import asyncio
import contextlib
import json
import os
import random
import time

import pytest
import torch

from conftest import SlowModel
from nanochat.common import atomic_write
from nanochat.engine import top_p_filter
from nanochat.server import ReplicaPool
from nanochat.serving import (ContextOverflowError, Prompt, Replica, Reply, RequestError, SamplingParams, build_prompt,
                              decode_json_body, parse_chat_request, reply_room)

DEFAULTS = SamplingParams(temperature=0.8, top_k=50, max_tokens=512)


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _ids(tok, name):
    return tok.encode_special(name)


# -----------------------------------------------------------------------------
# Requests


def test_defaults_fill_what_a_request_leaves_out():
    request = parse_chat_request({"messages": [_user("hi")], "temperature": None}, DEFAULTS)
    assert (request.temperature, request.top_k, request.max_tokens, request.top_p, request.n) == (0.8, 50, 512, 1.0, 1)
    assert request.seed is None and request.sampling(7).max_tokens == 7
    assert len({request.sampling(7).seed for _ in range(5)}) > 1  # no seed given: a fresh one each time


def test_openai_fields_and_text_parts():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    data = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}],
            "top_p": 0.5, "seed": 3, "n": 2, "stop": "x", "stream": True, "stream_options": {"include_usage": True},
            "max_completion_tokens": 9}
    request = parse_chat_request(data, DEFAULTS, openai=True)
    assert request.messages[1] == _user("ab") and request.max_tokens == 9
    got = (request.top_p, request.seed, request.n, request.stop, request.stream, request.include_usage)
    assert got == (0.5, 3, 2, ("x",), True, True)
    assert request.sampling(4).seed == 3
    with pytest.raises(RequestError, match="invalid content type list"):
        parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, DEFAULTS)


@pytest.mark.parametrize("data, message", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "only text content"),
    ({"messages": [_user("a")], "top_p": 0}, "top_p must be"),
    ({"messages": [_user("a")], "n": 9}, "n must be an integer between 1 and 8"),
    ({"messages": [_user("a")], "stop": ["a", ""]}, "stop must be"),
    ({"messages": [_user("a")], "stop": ["a", "b", "c", "d", "e"]}, "stop must be"),
    ({"messages": [_user("a")], "seed": 1.5}, "seed must be an integer"),
    ({"messages": [_user("a")], "stream": "yes"}, "stream must be true or false"),
    ({"messages": [_user("a")], "model": 3}, "model must be a string"),
    ({"messages": [{"role": "system", "content": "s"}]}, "system message must be followed by a user message"),
    ({"messages": [_user("a"), {"role": "system", "content": "s"}]}, "Message 1 is a system message"),
])
def test_openai_request_errors(data, message):
    with pytest.raises(RequestError, match=message):
        parse_chat_request(data, DEFAULTS, openai=True)


def test_json_body_errors():
    assert decode_json_body(b'{"a": 1}') == {"a": 1}
    for body, message in ((b"{bad", "not valid JSON"), (b"\xff", "not valid JSON"), (b"[1]", "must be a JSON object"),
                          (b"[" * 100_000, "nested too deeply")):
        with pytest.raises(RequestError, match=message):
            decode_json_body(body)


# -----------------------------------------------------------------------------
# Prompts


def test_prompt_is_the_training_format(byte_tokenizer):
    """The server's prompt is what render_for_completion gives for the same conversation, system message included."""
    tok = byte_tokenizer
    messages = [{"role": "system", "content": "You are terse."}, _user("What is 2+2?"), _assistant("4"), _user("And 3+3?")]
    expected = tok.render_for_completion({"messages": messages + [_assistant("")]})
    assert build_prompt(tok, messages, context_len=1000, reply_room=10) == Prompt(expected, 0, 1000)


def test_tool_call_text_round_trips_to_the_tokens_training_uses(byte_tokenizer):
    tok = byte_tokenizer
    raw = "12/60 = $<|python_start|>12/60<|python_end|><|output_start|>0.2<|output_end|>0.2 a minute"
    parts = [{"type": "text", "text": "12/60 = $"}, {"type": "python", "text": "12/60"},
             {"type": "python_output", "text": "0.2"}, {"type": "text", "text": "0.2 a minute"}]
    trained, _ = tok.render_conversation({"messages": [_user("q"), _assistant(parts)]})
    assert build_prompt(tok, [_user("q"), _assistant(raw)], 1000, 0).tokens == trained + [_ids(tok, "<|assistant_start|>")]
    # In the user's text the same names stay plain text: nobody can inject tokens the model never saw there.
    assert _ids(tok, "<|python_start|>") not in build_prompt(tok, [_user(raw)], 1000, 0).tokens


@pytest.mark.parametrize("tokenizer", ["byte_tokenizer", "bpe_tokenizer"])
def test_training_and_serving_render_the_same_ids(tokenizer, request):
    """One chat format: the server's prompt for a conversation is training's render of it, token for token, with
    a system message, several turns and calculator calls (which reach the server as the raw text Reply shows),
    also after the oldest turns are dropped. A real BPE tokenizer checks that no merge crosses a different
    boundary in the two."""
    tok = request.getfixturevalue(tokenizer)
    system = {"role": "system", "content": "You are terse. Numbers: 12 345."}
    call = [{"type": "text", "text": "It's $"}, {"type": "python", "text": "12/60"},
            {"type": "python_output", "text": "0.2"}, {"type": "text", "text": "0.2 a minute, we'll see."}]
    trained_turns = [_user("How fast is 12 per hour?"), _assistant(call), _user("And a second?"),
                     _assistant("I don't know.\n"), _user("Try again: they're here.")]
    # What a client sends back: each assistant turn as Reply(tools="raw") streamed the model's tokens of it.
    served_turns = []
    for message in trained_turns:
        if message["role"] == "assistant":
            ids, _ = tok.render_conversation({"messages": [_user("q"), message]})
            reply = Reply(tok, tools="raw")
            raw = "".join(reply.push(t) for t in ids[ids.index(_ids(tok, "<|assistant_start|>")) + 1:])
            message = _assistant(raw + reply.finish())
        served_turns.append(message)
    for kept in (0, 2, 4):  # the whole conversation, then with the oldest one and two turns dropped
        expected = tok.render_for_completion({"messages": [system, *trained_turns[kept:], _assistant("")]})
        full = build_prompt(tok, [system, *served_turns[kept:]], 1000, 0)
        assert full == Prompt(expected, 0, 1000)
        trimmed = build_prompt(tok, [system, *served_turns], len(expected) + 10, 10)
        assert trimmed == Prompt(expected, kept, len(expected) + 10)


def test_tool_token_names_without_their_pair_stay_tokens(byte_tokenizer):
    """A reply cut off inside a calculator call comes back with a name but not its pair: every name is still
    its token, in order, and the text between is text."""
    tok = byte_tokenizer
    raw = "cut <|output_end|>x<|python_start|><|python_start|>1+<|python_end|><|output_start|>"
    names = ["<|output_end|>", "<|python_start|>", "<|python_start|>", "<|python_end|>", "<|output_start|>"]
    tokens = build_prompt(tok, [_user("q"), _assistant(raw)], 1000, 0).tokens
    assert [t for t in tokens if t in {_ids(tok, n) for n in names}] == [_ids(tok, n) for n in names]
    assert tok.decode(tokens).endswith("<|assistant_start|>" + raw + "<|assistant_end|><|assistant_start|>")


def test_oldest_turns_go_first_and_the_system_message_stays(byte_tokenizer):
    tok = byte_tokenizer
    messages = [{"role": "system", "content": "S"}, _user("a" * 20), _assistant("b" * 20), _user("c" * 20),
                _assistant("d" * 20), _user("e" * 20)]
    full = build_prompt(tok, messages, 1000, 0)
    assert full.dropped == 0 and len(full.tokens) == 1 + (2 + 3 + 20) + 4 * 22 + 1
    prompt = build_prompt(tok, messages, context_len=81, reply_room=10)
    # One whole turn (user + assistant) dropped; what is left starts with the user, behind the system text.
    assert prompt.dropped == 2 and len(prompt.tokens) == 71
    assert prompt.tokens == build_prompt(tok, [messages[0], *messages[3:]], 1000, 0).tokens
    assert tok.decode(prompt.tokens).startswith("<|bos|><|user_start|>S\n\n" + "c" * 20)
    assert prompt.max_new_tokens(512) == 10 and prompt.max_new_tokens(3) == 3
    with pytest.raises(ContextOverflowError, match="Message 5 is too long for this model's context of 20 tokens"):
        build_prompt(tok, messages, context_len=20, reply_room=10)


def test_reply_room_is_at_most_half_the_context():
    assert reply_room(256, 2048) == 256 and reply_room(4096, 2048) == 1024


# -----------------------------------------------------------------------------
# Generated tokens -> text


def _push_all(reply, tokens):
    return "".join(reply.push(t) for t in tokens) + reply.finish()


def test_a_character_split_across_tokens_appears_once_whole(byte_tokenizer):
    reply = Reply(byte_tokenizer)
    pieces = [reply.push(b) for b in "é€".encode("utf-8")]
    assert pieces == ["", "é", "", "", "€"]
    assert reply.push(0xFF) == "\ufffd" and reply.push(0xC3) == "" and reply.finish() == "\ufffd"
    assert reply.finish_reason == "length" and reply.text == "é€\ufffd\ufffd"


def test_reply_ends_at_assistant_end_or_another_turns_frame(byte_tokenizer):
    tok = byte_tokenizer
    for name in ("<|assistant_end|>", "<|bos|>", "<|user_start|>"):
        reply = Reply(tok)
        assert _push_all(reply, [*tok.encode("hi"), _ids(tok, name), *tok.encode("more")]) == "hi"
        assert reply.done and reply.finish_reason == "stop" and len(reply.tokens) == 3


@pytest.mark.parametrize("tools, expected", [
    ("readable", "x = [calculator: 12/60 = 0.2]0.2, [calculator: 1/0] then [calculator: 3*4]"),
    ("raw", "x = <|python_start|>12/60<|python_end|><|output_start|>0.2<|output_end|>0.2, "
            "<|python_start|>1/0<|python_end|> then <|python_start|>3*4"),
])
def test_tool_calls_are_shown_readably_or_kept_by_name(byte_tokenizer, tools, expected):
    tok = byte_tokenizer
    ps, pe, os_, oe = (_ids(tok, n) for n in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"))
    tokens = [*tok.encode("x = "), ps, *tok.encode("12/60"), pe, os_, *tok.encode("0.2"), oe, *tok.encode("0.2, "),
              ps, *tok.encode("1/0"), pe, *tok.encode(" then "), ps, *tok.encode("3*4")]  # the last call is cut off
    assert _push_all(Reply(tok, tools=tools), tokens) == expected


def test_stop_strings_hold_back_what_might_start_one(byte_tokenizer):
    tok = byte_tokenizer
    reply = Reply(tok, stop=("END", "xyz"))
    shown = [reply.push(t) for t in tok.encode("abEN")]
    assert shown == ["a", "b", "", ""] and not reply.done
    assert reply.push(tok.encode("D")[0]) == "" and reply.done and reply.finish_reason == "stop"
    assert reply.text == "ab" and reply.push(tok.encode("q")[0]) == ""
    # A partial match that turns out not to be one is released; at the end, what is held comes out.
    reply = Reply(tok, stop=("END",))
    assert _push_all(reply, tok.encode("ENx EN")) == "ENx EN" and reply.finish_reason == "length"


def _first_stop_reference(text, stops):
    """What a reply with these stop strings shows of `text`: everything before the stop string that is complete
    first (earliest end; at the same end, the longest), or all of it."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s):end] == s]
        if starts:
            return text[:min(starts)], "stop"
    return text, "length"


def test_stop_strings_match_a_reference_however_the_text_is_cut(byte_tokenizer):
    tok, rng = byte_tokenizer, random.Random(0)
    for _ in range(300):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 25)))
        reply = Reply(tok, stop=stops)
        shown = _push_all(reply, tok.encode(text))
        assert (shown, reply.finish_reason) == _first_stop_reference(text, stops), (text, stops)


def test_a_long_stop_string_costs_time_linear_in_the_text(byte_tokenizer):
    # A 100,000-character stop whose prefix the reply keeps matching: comparing every prefix of the stop with the
    # held text at every token (what this once did) took 0.3 s a token here; matching character by character, not.
    tok = byte_tokenizer
    t0 = time.perf_counter()
    reply = Reply(tok, stop=("a" * 99_999 + "b",))
    shown = [reply.push(t) for t in tok.encode("a" * 20)]
    assert shown == [""] * 20 and not reply.done  # all of it might still become the stop string
    assert reply.finish() == "a" * 20
    assert time.perf_counter() - t0 < 1.5


# -----------------------------------------------------------------------------
# Sampling and the replica


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p, t=1.0: torch.isfinite(top_p_filter(logits, p, t))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.95) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    assert kept(0.6, t=100.0) == [True, True, True, False]  # a high temperature flattens the distribution first
    assert kept(5e-324) == [True, False, False, False]  # the smallest top_p allowed: 0 in float32, greedy still


@pytest.mark.usefixtures("one_thread")
def test_replica_top_p_near_zero_is_greedy(tiny_gpt, byte_tokenizer):
    replica = Replica(tiny_gpt(scrambled=True), byte_tokenizer)
    prompt = build_prompt(byte_tokenizer, [_user("hello")], replica.context_len, 8)
    greedy = list(replica.generate(prompt.tokens, SamplingParams(temperature=0.0, max_tokens=8)))
    nucleus = list(replica.generate(prompt.tokens, SamplingParams(temperature=1.0, top_k=0, top_p=1e-6, max_tokens=8, seed=5)))
    assert len(greedy) == 8 and nucleus == greedy


@pytest.mark.usefixtures("one_thread")
def test_closing_a_stream_frees_its_rows_for_the_next_request(tiny_gpt, byte_tokenizer):
    replica = Replica(SlowModel(tiny_gpt(scrambled=True), delay=0.01), byte_tokenizer, max_batch=1)
    pool = ReplicaPool([replica])
    params = SamplingParams(temperature=0.0, max_tokens=50)

    async def scenario():
        reply = Reply(byte_tokenizer)
        first = pool.generate([256, 1], params, [reply])
        worker, texts = await anext(first)
        assert worker == 0 and len(texts) == 1 and reply.tokens and pool.available() == 0
        waiting = asyncio.create_task(anext(pool.generate([256, 2], params, [Reply(byte_tokenizer)])))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # the only row is taken: the second request waits its turn
        assert pool.workers()[0]["queued_requests"] == 1
        await first.aclose()
        worker, texts = await asyncio.wait_for(waiting, timeout=5)
        return worker

    try:
        assert asyncio.run(scenario()) == 0
    finally:
        pool.close()


@pytest.mark.usefixtures("one_thread")
def test_a_generation_error_reaches_the_request_and_the_replica_serves_on(tiny_gpt, byte_tokenizer):
    model = SlowModel(tiny_gpt(scrambled=True), delay=0.01, fail=True)
    pool = ReplicaPool([Replica(model, byte_tokenizer, max_batch=2)])

    async def scenario():
        with pytest.raises(RuntimeError, match="the model broke"):
            async with contextlib.aclosing(pool.generate([256, 1], SamplingParams(max_tokens=20), [Reply(byte_tokenizer)])) as steps:
                async for _ in steps:
                    pass
        model.fail = False
        reply = Reply(byte_tokenizer)
        async for _ in pool.generate([256, 1], SamplingParams(max_tokens=3, temperature=0.0), [reply]):
            pass
        return len(reply.tokens), pool.available()

    try:
        assert asyncio.run(scenario()) == (3, 1)
    finally:
        pool.close()


@pytest.mark.usefixtures("one_thread")
def test_a_reader_that_falls_behind_gets_every_column_made_since_in_one_burst(tiny_gpt, byte_tokenizer):
    replica = Replica(SlowModel(tiny_gpt(scrambled=True), delay=0.02), byte_tokenizer)
    pool = ReplicaPool([replica])
    params = SamplingParams(temperature=0.0, max_tokens=12)
    alone = list(replica.generate([256, 1], params))

    async def scenario():
        reply = Reply(byte_tokenizer)
        steps = pool.generate([256, 1], params, [reply])
        await anext(steps)
        per_burst = [len(reply.tokens)]
        while pool.workers()[0]["running_requests"]:  # the batch makes the rest while this reader sleeps
            await asyncio.sleep(0.01)
        async for _ in steps:  # the burst of everything made since, then the text the reply held back
            per_burst.append(len(reply.tokens) - sum(per_burst))
        return per_burst, reply.tokens

    try:
        per_burst, tokens = asyncio.run(scenario())
    finally:
        pool.close()
    # Two bursts of columns (the second carrying more than one), then the closing yield of held-back text.
    assert len(alone) > 2 and len(per_burst) == 3 and per_burst[1] > 1 and per_burst[2] == 0
    assert tokens == [column[0] for column in alone]


@pytest.mark.usefixtures("one_thread")
def test_the_last_burst_of_a_finished_request_does_not_wait_out_the_write_interval(tiny_gpt, byte_tokenizer, monkeypatch):
    monkeypatch.setattr("nanochat.server.WRITE_INTERVAL_S", 30.0)  # a pause after the last burst would hang the test
    pool = ReplicaPool([Replica(tiny_gpt(scrambled=True), byte_tokenizer)])

    async def scenario():
        reply = Reply(byte_tokenizer)
        async for _ in pool.generate([256, 1], SamplingParams(temperature=0.0, max_tokens=1), [reply]):
            pass
        return reply.tokens

    try:
        t0 = time.perf_counter()
        assert len(asyncio.run(asyncio.wait_for(scenario(), timeout=20))) == 1
        assert time.perf_counter() - t0 < 10
    finally:
        pool.close()


# -----------------------------------------------------------------------------
# Golden prompts and greedy replies: what the serving path produced before its chat renderer was merged into
# the tokenizer's. After a deliberate format or model change, regenerate with
#     NANOCHAT_UPDATE_GOLDEN=1 uv run pytest tests/test_serving.py -k golden

GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "golden", "serving_greedy.json")
_SYSTEM = {"role": "system", "content": "You are terse. Answer briefly."}
GOLDEN_CHATS = [
    [_user("hello")],
    [_SYSTEM, _user("What is 2+2?"), _assistant("4"), _user("And 3+3?")],
    [_SYSTEM, _user("a" * 20), _assistant("b" * 20), _user("c" * 20), _assistant("d" * 20), _user("e" * 20)],
    [_user("q"), _assistant("12/60 = $<|python_start|>12/60<|python_end|><|output_start|>0.2<|output_end|>0.2"),
     _user("more")],
    [_user("q"), _assistant("cut <|python_start|>1+"), _user("and <|python_end|> lone")],
    [_user("one"), _user("two"), _assistant("three"), _assistant("four")],  # the server takes turns as they come
    [_SYSTEM, _user("x" * 30), _assistant("y" * 30), _user("z" * 30)],
]


@pytest.mark.usefixtures("one_thread")
def test_golden_prompts_and_greedy_replies(byte_tokenizer, bpe_tokenizer, tiny_gpt):
    got = {}
    for name, tok in (("byte", byte_tokenizer), ("bpe", bpe_tokenizer)):
        for i, messages in enumerate(GOLDEN_CHATS):
            for context_len, room in ((1000, 10), (81, 10), (60, 8), (40, 5)):  # the smaller ones drop turns
                try:
                    prompt = build_prompt(tok, messages, context_len, room)
                    got[f"{name} {i} {context_len} {room}"] = [prompt.dropped, prompt.tokens]
                except ContextOverflowError as e:
                    got[f"{name} {i} {context_len} {room}"] = [e.param, str(e)]
    replica = Replica(tiny_gpt(sequence_len=128, scrambled=True), byte_tokenizer)
    for i, messages in enumerate(GOLDEN_CHATS):
        prompt = build_prompt(byte_tokenizer, messages, replica.context_len, 16)
        reply = Reply(byte_tokenizer, tools="raw")
        for column in replica.generate(prompt.tokens, SamplingParams(temperature=0.0, max_tokens=16)):
            reply.push(column[0])
        got[f"greedy {i}"] = reply.tokens
    replica.close()
    if os.environ.get("NANOCHAT_UPDATE_GOLDEN") == "1":
        atomic_write(GOLDEN_PATH, json.dumps(got) + "\n")
    with open(GOLDEN_PATH) as f:
        expected = json.load(f)
    assert got == expected, "serving's prompts or greedy replies changed; if deliberate, regenerate (see above)"
