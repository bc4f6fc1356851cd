"""scripts/chat_web.py against hostile and careless clients, over real HTTP on loopback (the `chat_server` and
`serve_chat` fixtures): stop strings that could stall the event loop, clients that leave a non-streaming request,
numbers Python cannot convert, text UTF-8 cannot encode, a log that cannot be written, who may connect (address,
CORS, API key), slow clients, a connection limit, and a shutdown that ends generations."""

import json
import logging
import os
import socket
import stat
import threading
import time

import httpx
import openai
import pytest

from conftest import SlowModel
from nanochat.serving import MAX_STOP_CHARS

pytestmark = pytest.mark.usefixtures("one_thread")

USER = {"role": "user", "content": "hi"}
# The micro model's greedy reply to "go on" runs to the end of the context (119 tokens) without a stop token.
GO_ON = [{"role": "user", "content": "go on"}]


def _stats(url):
    return httpx.get(url + "/stats", timeout=10).json()


def _wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _records(log_path):
    return [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()]


def _slow(served, monkeypatch, delay=0.05, fail=False):
    scheduler = served.app.state.pool.replicas[0].scheduler
    slow = SlowModel(scheduler.model, delay=delay, fail=fail)
    monkeypatch.setattr(scheduler, "model", slow)
    return slow


# -----------------------------------------------------------------------------
# 1. Stop strings


def test_a_stop_string_past_the_limit_is_refused_and_an_allowed_one_never_stalls_the_server(chat_server):
    # 400,000 characters once kept every other client waiting seconds per generated token.
    huge = {"messages": [USER], "max_tokens": 3, "stop": ["\u0000" + "q" * 400_000]}
    t0 = time.monotonic()
    response = httpx.post(chat_server.url + "/v1/chat/completions", json=huge, timeout=20)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == f"stop strings must be at most {MAX_STOP_CHARS} characters each"
    assert time.monotonic() - t0 < 5

    # The longest allowed stop, built to be held back as long as possible, while /health answers at once.
    body = {"messages": GO_ON, "max_tokens": 4096, "temperature": 0.0, "stream": True,
            "stop": ["a" * (MAX_STOP_CHARS - 1) + "b", "x" * MAX_STOP_CHARS]}
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions", json=body, timeout=30) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        next(lines)
        for _ in range(5):
            t0 = time.monotonic()
            assert httpx.get(chat_server.url + "/health", timeout=5).status_code == 200
            assert time.monotonic() - t0 < 1.0
        assert list(lines)[-2] == "data: [DONE]"


# -----------------------------------------------------------------------------
# 2. A non-streaming client that leaves


def test_a_non_streaming_client_that_leaves_frees_its_row(chat_server, monkeypatch):
    slow = _slow(chat_server, monkeypatch)  # 119 tokens at 50 ms each: about 6 s if nobody stops it
    body = {"messages": GO_ON, "max_tokens": 4096, "temperature": 0.0, "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(chat_server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    _wait_until(lambda: _stats(chat_server.url)["active_rows"] == 0, 2, "the row of a client that left stayed busy")
    assert slow.forwards < 60
    _wait_until(lambda: any(r["messages"] == GO_ON and r["disconnected"] and r["endpoint"] == "/v1/chat/completions"
                            for r in _records(chat_server.log_path)), 2, "the request was not logged as disconnected")

    # The openai client's own timeout and retries: each try is cancelled when it gives up.
    with openai.OpenAI(base_url=chat_server.url + "/v1", api_key="x", timeout=0.5, max_retries=1) as client:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="nanochat", messages=GO_ON, max_tokens=4096, temperature=0.0)
    _wait_until(lambda: _stats(chat_server.url)["active_rows"] == 0, 2, "the openai client's tries kept generating")


# -----------------------------------------------------------------------------
# 3. Numbers and failures answer in the API's JSON format


@pytest.mark.parametrize("endpoint, raw, message", [
    ("/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "x": 1' + b"7" * 5000 + b"}",
     "Request body is not valid JSON"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 4400 + b"}",
     "Request body is not valid JSON"),
    ("/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1' + b"0" * 400 + b"}",
     "Temperature must be between 0.0 and 2.0"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1' + b"0" * 400 + b"}",
     "top_p must be"),
])
def test_huge_integers_get_a_400_in_json(chat_server, endpoint, raw, message):
    response = httpx.post(chat_server.url + endpoint, content=raw, headers={"content-type": "application/json"},
                          timeout=10)
    assert response.status_code == 400, response.text
    detail = response.json()
    assert (detail["error"]["message"] if endpoint.startswith("/v1") else detail["detail"]).startswith(message)


def test_a_generation_failure_without_streaming_is_a_json_error(chat_server, monkeypatch):
    _slow(chat_server, monkeypatch, delay=0.0, fail=True)
    response = httpx.post(chat_server.url + "/v1/chat/completions", timeout=10,
                          json={"messages": [USER], "max_tokens": 5, "stream": False})
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "generation failed on the server; see its log",
                                        "type": "server_error", "param": None, "code": None}
    assert _stats(chat_server.url)["active_rows"] == 0


def test_a_generation_failure_while_streaming_is_told_in_the_stream_and_logged_on_both_endpoints(chat_server,
                                                                                                  monkeypatch):
    _slow(chat_server, monkeypatch, delay=0.0, fail=True)
    body = {"messages": [{"role": "user", "content": "fail while streaming"}], "max_tokens": 5, "stream": True}
    last = {}
    for endpoint in ("/chat/completions", "/v1/chat/completions"):
        with httpx.stream("POST", chat_server.url + endpoint, json=body, timeout=10) as stream:
            last[endpoint] = json.loads([line for line in stream.iter_lines() if line][-1][6:])
    message = "generation failed on the server; see its log"
    assert last == {"/chat/completions": {"error": message},
                    "/v1/chat/completions": {"error": {"message": message, "type": "server_error", "param": None,
                                                       "code": None}}}
    records = [r for r in _records(chat_server.log_path) if r["messages"] == body["messages"]]
    assert [(r["endpoint"], r["disconnected"]) for r in records] == [(e, False) for e in last]
    assert _stats(chat_server.url)["active_rows"] == 0


# -----------------------------------------------------------------------------
# 4. The conversation log


def test_a_lone_surrogate_keeps_its_reply_and_is_logged_exactly(chat_server):
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 3, "temperature": 0.0'
    whole = httpx.post(chat_server.url + "/v1/chat/completions", content=raw + b', "seed": 5}',
                       headers={"content-type": "application/json"}, timeout=20)
    assert whole.status_code == 200, whole.text
    reply = whole.json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", chat_server.url + "/chat/completions", content=raw + b"}",
                      headers={"content-type": "application/json"}, timeout=20) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line]
    assert events[-1] == {"done": True}
    records = [r for r in _records(chat_server.log_path) if r["messages"] == [{"role": "user", "content": "hi \ud800"}]]
    assert [r["endpoint"] for r in records] == ["/v1/chat/completions", "/chat/completions"]
    assert records[0]["replies"] == [reply]


def test_a_log_that_cannot_be_written_costs_no_reply_and_is_reported_once(serve_chat, caplog):
    caplog.set_level(logging.INFO)
    with serve_chat("--log-conversations", "/dev/full") as served:  # every write fails: no space left on device
        for stream in (False, True, False):
            response = httpx.post(served.url + "/v1/chat/completions", timeout=20,
                                  json={"messages": [USER], "max_tokens": 3, "stream": stream})
            assert response.status_code == 200
            assert "[DONE]" in response.text if stream else response.json()["choices"][0]["finish_reason"]
        _wait_until(lambda: _stats(served.url)["active_rows"] == 0, 2, "a row stayed busy")
    failures = [r for r in caplog.records if "conversation log" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR and "/dev/full" in failures[0].getMessage()


def test_the_log_is_created_readable_by_its_owner_only(serve_chat, tmp_path):
    path = tmp_path / "chats.jsonl"
    with serve_chat("--log-conversations", str(path)) as served:
        assert httpx.post(served.url + "/v1/chat/completions", json={"messages": [USER], "max_tokens": 2},
                          timeout=20).status_code == 200
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(_records(path)) == 1


# -----------------------------------------------------------------------------
# 5. Who may connect


def test_by_default_only_this_machine_can_connect_and_the_log_says_so(serve_chat, caplog):
    from nanochat.server import serving_line

    caplog.set_level(logging.INFO)
    with serve_chat() as served:  # no --host
        assert served.host == "127.0.0.1"
        port = int(served.url.rsplit(":", 1)[1])
    assert f"http://127.0.0.1:{port}/v1 (listening on 127.0.0.1 only)" in caplog.text
    assert serving_line("0.0.0.0", 8000).endswith("(listening on every network interface (0.0.0.0): other machines "
                                                  "can connect)")


def test_no_other_web_page_may_call_the_api_unless_named(chat_server, serve_chat):
    evil = {"origin": "https://evil.example", "content-type": "text/plain"}
    body = json.dumps({"messages": [USER], "max_tokens": 1})
    for endpoint in ("/chat/completions", "/v1/chat/completions"):
        response = httpx.post(chat_server.url + endpoint, content=body, headers=evil, timeout=20)
        assert "access-control-allow-origin" not in response.headers
    preflight = httpx.options(chat_server.url + "/v1/chat/completions", timeout=10, headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    with serve_chat("--cors-origins", "https://ok.example") as served:
        ok = httpx.post(served.url + "/v1/chat/completions", content=body, timeout=20,
                        headers={"origin": "https://ok.example", "content-type": "application/json"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
        refused = httpx.post(served.url + "/v1/chat/completions", content=body, headers=evil, timeout=20)
        assert "access-control-allow-origin" not in refused.headers


def test_an_api_key_guards_the_openai_endpoints(serve_chat, monkeypatch):
    monkeypatch.setenv("NANOCHAT_API_KEY", "env-key")
    for argv, key in ((["--api-key", "s3cret"], "s3cret"), ([], "env-key")):
        with serve_chat(*argv) as served:
            with openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0, timeout=20) as client:
                reply = client.chat.completions.create(model="nanochat", messages=[USER], max_tokens=2)
                assert reply.choices[0].message.role == "assistant" and len(client.models.list().data) == 1
            with openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0, timeout=20) as client:
                with pytest.raises(openai.AuthenticationError) as err:
                    client.chat.completions.create(model="nanochat", messages=[USER], max_tokens=2)
                assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
                with pytest.raises(openai.AuthenticationError):
                    client.models.list()
            bare = httpx.post(served.url + "/v1/chat/completions", json={"messages": [USER]}, timeout=10)
            assert bare.status_code == 401 and bare.json()["error"]["type"] == "invalid_request_error"
            assert httpx.get(served.url + "/health", timeout=10).status_code == 200


def test_an_api_key_guards_the_ui_endpoint_too(serve_chat):
    body = {"messages": [USER], "max_tokens": 2}
    with serve_chat("--api-key", "s3cret") as served:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            refused = httpx.post(served.url + "/chat/completions", json=body, headers=headers, timeout=20)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert "API key" in refused.json()["detail"]
        ok = httpx.post(served.url + "/chat/completions", json=body, headers={"authorization": "Bearer s3cret"},
                        timeout=20)
        assert ok.status_code == 200 and 'data: {"done": true}' in ok.text
        # What stays open to all holds nothing secret: the page, readiness and load (counts and device names).
        for path in ("/", "/health", "/stats"):
            page = httpx.get(served.url + path, timeout=10)
            assert page.status_code == 200 and "s3cret" not in page.text
        assert set(_stats(served.url)["workers"][0]) == {"gpu_id", "device", "max_batch", "active_rows",
                                                          "running_requests", "queued_requests"}


# -----------------------------------------------------------------------------
# 6. Slow clients, too many connections, shutting down


def _connect(url):
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_until_closed(sock, seconds):
    """Everything the server sends until it closes the connection; fails if it is still open after `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open past {seconds} s; it sent {data[:200]!r}")
    return data


def test_slow_clients_are_dropped(serve_chat):
    with serve_chat("--client-timeout", "1") as served:
        t0 = time.monotonic()
        partial_headers = _connect(served.url)
        partial_headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        dripping = _connect(served.url)  # a byte now and then must not keep the headers' clock from running
        with pytest.raises(OSError):  # the server closes the connection under it, well before the 12 bytes
            for byte in b"GET /health HTTP/1.1\r\n"[:12]:
                dripping.sendall(bytes([byte]))
                time.sleep(0.25)
        assert time.monotonic() - t0 < 2.5
        assert _read_until_closed(partial_headers, 3) == b""
        partial_body = _connect(served.url)
        partial_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"messages\": ")
        answer = _read_until_closed(partial_body, 4)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"Request body not received within 1 s" in answer
        assert time.monotonic() - t0 < 10
        for sock in (partial_headers, dripping, partial_body):
            sock.close()
        assert httpx.get(served.url + "/health", timeout=5).status_code == 200  # an honest client still gets in


def test_connections_past_the_limit_get_503(serve_chat):
    with serve_chat("--max-connections", "3") as served:
        assert httpx.get(served.url + "/health", timeout=5).status_code == 200
        idle = [_connect(served.url) for _ in range(3)]
        time.sleep(0.2)  # the server has accepted them
        assert httpx.get(served.url + "/health", timeout=5).status_code == 503
        for sock in idle:
            sock.close()
        _wait_until(lambda: httpx.get(served.url + "/health", timeout=5).status_code == 200, 3,
                    "closed connections still counted")


def test_a_stopping_server_ends_its_generations_and_tells_the_clients(serve_chat, monkeypatch):
    with serve_chat("--shutdown-timeout", "5") as served:
        _slow(served, monkeypatch, delay=0.2)  # the whole reply would take about 24 s
        body = {"messages": GO_ON, "max_tokens": 4096, "temperature": 0.0}
        answers = {}

        def ask(name, endpoint, stream):
            with httpx.Client(timeout=30) as client:
                answers[name] = client.post(served.url + endpoint, json={**body, "stream": stream})

        clients = [threading.Thread(target=ask, args=("ui", "/chat/completions", True)),
                   threading.Thread(target=ask, args=("api", "/v1/chat/completions", False))]
        for thread in clients:
            thread.start()
        _wait_until(lambda: _stats(served.url)["active_rows"] == 2, 5, "the two requests did not start")
        t0 = time.monotonic()
        served.server.should_exit = True  # what SIGTERM does
        served.thread.join(timeout=4)
        assert not served.thread.is_alive(), "the server waited for its generations"
        assert time.monotonic() - t0 < 4
        for thread in clients:
            thread.join(timeout=5)
        events = [json.loads(line[6:]) for line in answers["ui"].text.splitlines() if line]
        assert events[-1] == {"error": "the server is shutting down; try again later"}
        assert answers["api"].status_code == 503
        assert answers["api"].json()["error"]["message"] == "the server is shutting down; try again later"
