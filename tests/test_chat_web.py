"""scripts/chat_web.py over real HTTP on loopback, serving the micro chat model (the `chat_server` fixture): the UI
files, health and stats, the streaming format, the request limits, disconnects and the conversation log.
The OpenAI API is tested with the official client in tests/test_openai_api.py."""

import concurrent.futures
import json
import re
import threading
import time

import httpx
import pytest

from conftest import CHAT_CONTEXT, SlowModel  # the micro model's context, which the trimming and overflow messages name

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
    assert httpx.get(chat_server.url + "/stats").json() == {
        "total_workers": 1, "available_workers": 1, "busy_workers": 0, "active_rows": 0, "queued_requests": 0,
        "workers": [{"gpu_id": 0, "device": "cpu", "max_batch": 16, "active_rows": 0, "running_requests": 0,
                     "queued_requests": 0}]}


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
    ({"messages": [{"role": "system", "content": "s" * 200}, USER]}, 400,
     f"Message 0 (the system message) is too long for this model's context of {CHAT_CONTEXT} tokens"),
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


def _stats(chat_server):
    return httpx.get(chat_server.url + "/stats").json()


def test_a_client_that_disconnects_frees_its_rows_at_once(chat_server, monkeypatch):
    scheduler = chat_server.app.state.pool.replicas[0].scheduler
    slow = SlowModel(scheduler.model)
    monkeypatch.setattr(scheduler, "model", slow)
    # The micro model's greedy reply to "go on" runs to the end of the context (119 tokens) without a stop token.
    body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 4096, "temperature": 0.0}
    with httpx.stream("POST", chat_server.url + "/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()  # (held: dropping the iterator would close the stream already)
        next(lines)  # the first token arrived: generation is under way
        assert _stats(chat_server)["active_rows"] == 1
    t0 = time.monotonic()
    while _stats(chat_server)["active_rows"] != 0:
        assert time.monotonic() - t0 < 2, "the rows of a disconnected client were not freed"
        time.sleep(0.02)
    count = slow.forwards
    time.sleep(0.3)
    assert slow.forwards == count < 40  # it stopped generating, far short of the 119 tokens of the whole reply
    monkeypatch.undo()
    assert _chat(chat_server.url, {"messages": [USER], "max_tokens": 3})[-1] == {"done": True}
    records = [json.loads(line) for line in chat_server.log_path.read_text(encoding="utf-8").splitlines()]
    assert any(r["messages"] == body["messages"] and r["disconnected"] for r in records)


def test_concurrent_streams_share_the_batch_and_each_gets_its_reply_alone(chat_server, monkeypatch):
    scheduler = chat_server.app.state.pool.replicas[0].scheduler
    # Prompts of different lengths whose greedy replies run past 12 tokens without stopping.
    bodies = [{"messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0.0}
              for text in ("go on", "x", "Tell me everything!")]
    alone = ["".join(e.get("token", "") for e in _chat(chat_server.url, body)) for body in bodies]
    slow = SlowModel(scheduler.model)  # slow enough that the three requests overlap
    monkeypatch.setattr(scheduler, "model", slow)
    seen = []

    def watch():
        while len(seen) < 400 and not done.is_set():
            seen.append(scheduler.stats()["active_rows"])
            time.sleep(0.01)

    done = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: "".join(e.get("token", "") for e in _chat(chat_server.url, body)), bodies))
    done.set()
    watcher.join()
    assert replies == alone  # greedy: the same reply batched as alone
    assert max(seen) == len(bodies)  # all three were in the batch at once


def test_every_request_is_logged_as_one_json_line(chat_server):
    messages = [{"role": "user", "content": "log me ☕"}]
    events = _chat(chat_server.url, {"messages": messages, "max_tokens": 5, "temperature": 0.5, "top_k": 7})
    reply = "".join(e.get("token", "") for e in events)
    records = [json.loads(line) for line in chat_server.log_path.read_text(encoding="utf-8").splitlines()]
    record = next(r for r in records if r["messages"] == messages)
    assert record["replies"] == [reply] and record["endpoint"] == "/chat/completions" and not record["disconnected"]
    assert (record["temperature"], record["top_k"], record["max_tokens"]) == (0.5, 7, 5)
    assert record["prompt_tokens"] == 1 + 2 + len("log me ☕".encode()) + 1 and 1 <= record["completion_tokens"] <= 5
