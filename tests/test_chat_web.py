"""scripts/chat_web.py over real HTTP on loopback, serving the micro chat model (the `chat_server` fixture): the UI
files, health and stats, the streaming format, the request limits, disconnects and the conversation log.
The OpenAI API is tested with the official client in tests/test_openai_api.py."""

import json
import re
import time

import httpx
import pytest

from conftest import CHAT_CONTEXT  # the micro model's context, which the trimming and overflow messages name

pytestmark = pytest.mark.usefixtures("one_thread")


def _events(response):
    """The JSON payloads of a server-sent event stream; every line is `data: ...` or blank."""
    events = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            events.append(json.loads(line[len("data: "):]))
    return events


def _chat(url, body, endpoint="/chat/completions"):
    with httpx.stream("POST", url + endpoint, json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return _events(response)


def test_ui_logo_health_and_stats(chat_server):
    page = httpx.get(chat_server.url + "/", timeout=10)
    assert page.status_code == 200 and "<title>NanoChat</title>" in page.text
    # Self-contained: nothing loaded from another host.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)
    logo = httpx.get(chat_server.url + "/logo.svg", timeout=10)
    assert logo.headers["content-type"].startswith("image/svg+xml") and logo.text.startswith("<svg")
    assert httpx.get(chat_server.url + "/health").json() == {"status": "ok", "ready": True, "num_gpus": 1,
                                                             "available_workers": 1}
    assert httpx.get(chat_server.url + "/stats").json() == {"total_workers": 1, "available_workers": 1, "busy_workers": 0,
                                                            "workers": [{"gpu_id": 0, "device": "cpu"}]}


def test_reply_streams_as_token_events_then_done(chat_server):
    events = _chat(chat_server.url, {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
                                     "temperature": 1.0, "top_k": 0})
    assert events[-1] == {"done": True}
    tokens = events[:-1]
    assert all(set(e) == {"token", "gpu"} and e["token"] and e["gpu"] == 0 for e in tokens)
    assert len(tokens) <= 12


def test_a_conversation_past_the_context_drops_its_oldest_turns_with_a_notice(chat_server):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i} " * 3}]
    turns.append({"role": "user", "content": "last one"})
    events = _chat(chat_server.url, {"messages": turns, "max_tokens": 4})
    notice = events[0]
    assert notice["dropped_messages"] > 0 and f"context of {CHAT_CONTEXT} tokens" in notice["notice"]
    assert notice["dropped_messages"] % 2 == 0  # whole turns: the rest still starts with the user
    assert events[-1] == {"done": True}


LONG = "x" * 8001
USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "Request body is not valid JSON"),
    (b'["a", "list"]', 400, "Request body must be a JSON object, got list"),
    ({}, 400, "At least one message is required"),
    ({"messages": []}, 400, "At least one message is required"),
    ({"messages": "hi"}, 400, "messages must be a list"),
    ({"messages": [USER] * 501}, 400, "Too many messages. Maximum 500 messages allowed per request"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "Message 0 has empty content"),
    ({"messages": [USER, {"role": "assistant", "content": LONG}]}, 400,
     "Message 1 is too long. Maximum 8000 characters allowed per message"),
    ({"messages": [{"role": "user", "content": "y" * 7000}] * 5}, 400,
     "Total conversation is too long. Maximum 32000 characters allowed"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, 400, "Message 0 has invalid role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "Message 0 has invalid content type int"),
    ({"messages": ["hi"]}, 400, "Message 0 must be an object"),
    ({"messages": [USER], "temperature": 2.5}, 400, "Temperature must be between 0.0 and 2.0"),
    ({"messages": [USER], "temperature": "hot"}, 400, "Temperature must be between 0.0 and 2.0"),
    ({"messages": [USER], "top_k": 201}, 400, "top_k must be between 0 and 200"),
    ({"messages": [USER], "top_k": -1}, 400, "top_k must be between 0 and 200"),
    ({"messages": [USER], "top_k": 2.5}, 400, "top_k must be between 0 and 200"),
    ({"messages": [USER], "max_tokens": 0}, 400, "max_tokens must be between 1 and 4096"),
    ({"messages": [USER], "max_tokens": 4097}, 400, "max_tokens must be between 1 and 4096"),
    ({"messages": [USER], "max_tokens": True}, 400, "max_tokens must be between 1 and 4096"),
    ({"messages": [{"role": "user", "content": "z" * 7000}]}, 400,
     f"Message 0 is too long for this model's context of {CHAT_CONTEXT} tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "w" * 8000}] * 200}).encode(), 413, "Request body is too large"),
])
def test_refused_requests_get_a_4xx_and_a_json_message(chat_server, body, status, message):
    for endpoint in ("/chat/completions", "/v1/chat/completions"):
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        response = httpx.post(chat_server.url + endpoint, timeout=30, headers={"content-type": "application/json"},
                              **kwargs)
        assert response.status_code == status, (endpoint, response.text)
        detail = response.json()
        text = detail["error"]["message"] if endpoint.startswith("/v1") else detail["detail"]
        assert text.startswith(message), (endpoint, text)
        if endpoint.startswith("/v1"):
            assert detail["error"]["type"] == "invalid_request_error"
    assert httpx.get(chat_server.url + "/health").json()["available_workers"] == 1  # nothing was left holding a slot


def test_a_client_that_disconnects_frees_its_slot_at_once(chat_server, monkeypatch):
    replica = chat_server.app.state.pool.replicas[0]
    real_generate, produced = replica.generate, []

    def slow_generate(prompt_tokens, params):
        for column in real_generate(prompt_tokens, params):
            time.sleep(0.05)  # ~6 s for the whole reply: far longer than the test waits
            produced.append(column)
            yield column

    monkeypatch.setattr(replica, "generate", slow_generate)
    body = {"messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": 4096, "temperature": 0.0}
    with httpx.stream("POST", chat_server.url + "/chat/completions", json=body, timeout=30) as response:
        next(response.iter_lines())  # the first token arrived: generation is under way
    t0 = time.monotonic()
    while httpx.get(chat_server.url + "/health").json()["available_workers"] != 1:
        assert time.monotonic() - t0 < 2, "the slot of a disconnected client was not freed"
        time.sleep(0.02)
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count < 40  # it stopped generating, far short of the ~120 tokens the reply had room for
    monkeypatch.undo()
    assert _chat(chat_server.url, {"messages": [USER], "max_tokens": 3})[-1] == {"done": True}
    records = [json.loads(line) for line in chat_server.log_path.read_text(encoding="utf-8").splitlines()]
    assert any(r["messages"] == body["messages"] and r["disconnected"] for r in records)


def test_every_request_is_logged_as_one_json_line(chat_server):
    messages = [{"role": "user", "content": "log me ☕"}]
    events = _chat(chat_server.url, {"messages": messages, "max_tokens": 5, "temperature": 0.5, "top_k": 7})
    reply = "".join(e.get("token", "") for e in events)
    records = [json.loads(line) for line in chat_server.log_path.read_text(encoding="utf-8").splitlines()]
    record = next(r for r in records if r["messages"] == messages)
    assert record["replies"] == [reply] and record["endpoint"] == "/chat/completions" and not record["disconnected"]
    assert (record["temperature"], record["top_k"], record["max_tokens"]) == (0.5, 7, 5)
    assert record["prompt_tokens"] == 1 + 2 + len("log me ☕".encode()) + 1 and 1 <= record["completion_tokens"] <= 5
