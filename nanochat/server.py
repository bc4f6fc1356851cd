"""
The chat web server in front of a pool of model replicas; `python -m scripts.chat_web` runs it with uvicorn.

    GET  /, /logo.svg          the chat UI (nanochat/ui.html) and its favicon
    POST /chat/completions     the UI's server-sent events: {"token", "gpu"} ... {"done": true}
    GET  /health, /stats       readiness, workers, batch rows and queue (open even with an API key)
    POST /v1/chat/completions  OpenAI chat completions, streaming or not; GET /v1/models the one model served
"""

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import pathlib
import secrets
import threading
import time
import uuid

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat import serving
from nanochat.batching import END
from nanochat.serving import (MAX_BODY_BYTES, Reply, RequestError, build_prompt, decode_json_body, parse_chat_request,
                              reply_room)

logger = logging.getLogger(__name__)

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# Replicas


class ServerStopping(Exception):
    """The server is shutting down: generations end at their next step."""


# A stream writes at most every this many seconds: each write costs the event loop, under the batch thread's GIL,
# about what one more batch row costs the model, and 50 updates a second are smoother than a reader can tell.
WRITE_INTERVAL_S = 0.02


class ReplicaPool:
    """Model replicas (nanochat.serving.Replica) for the event loop. A request goes to the replica with the fewest
    rows in use or waiting; each replica's batch computes on its own thread, so the loop keeps serving meanwhile."""

    def __init__(self, replicas):
        self.replicas = list(replicas)
        if not self.replicas:
            raise ValueError("a ReplicaPool needs at least one replica")
        self.stopping, self.context_len = False, self.replicas[0].context_len
        self._streams = {}  # wake -> ready queue of every request being generated, for stop_generating

    def workers(self):
        """Per replica: {"gpu_id", "device", "max_batch", "active_rows", "running_requests", "queued_requests"}."""
        return [{"gpu_id": r.index, "device": r.device, **r.scheduler.stats()} for r in self.replicas]

    def available(self):
        """Replicas that would start a new one-sample request at once: a free row and nobody waiting."""
        return sum(1 for w in self.workers() if w["active_rows"] < w["max_batch"] and not w["queued_requests"])

    async def generate(self, prompt_tokens, params, replies):
        """Generate one request into `replies` (a serving.Reply per sample): yield (worker id, [new text per sample])
        for the columns made since the last yield, at most every WRITE_INTERVAL_S, then the text each reply still
        held back. Stops once every reply is done; closing it cancels the request."""
        if self.stopping:
            raise ServerStopping("the server is shutting down")
        replica = min(self.replicas,  # the fewest rows in use or waiting
                      key=lambda r: sum(r.scheduler.stats()[k] for k in ("active_rows", "queued_requests")))
        loop, ready, wake = asyncio.get_running_loop(), collections.deque(), asyncio.Event()
        waiting = False  # the reader sleeps on `wake`: only then does a column need to wake it

        def deliver(item):  # on the batch's thread: a column, then END or the error
            ready.append(item)  # before reading `waiting`; the reader sets it before looking at `ready` (no lost wake)
            if waiting or item is END or isinstance(item, BaseException):  # the end also cuts a pause short
                try:
                    loop.call_soon_threadsafe(wake.set)
                except RuntimeError:  # the loop is closed: the server is gone, and nobody waits for this
                    logger.debug("event loop closed before a request on worker %d ended", replica.index)

        request = replica.submit(prompt_tokens, params, deliver=deliver)
        self._streams[wake] = ready
        try:
            while True:
                waiting = True
                if not ready:
                    await wake.wait()
                waiting = False
                wake.clear()
                columns, last = [], None
                while ready and last is None:
                    item = ready.popleft()
                    if item is END or isinstance(item, BaseException):
                        last = item
                    else:
                        columns.append(item)
                if columns:
                    texts = ["".join([reply.push(column[i]) for column in columns]) for i, reply in enumerate(replies)]
                    yield replica.index, texts  # one write per burst; Reply.push is the only per-token step here
                    if all(reply.done for reply in replies):
                        break
                    if last is None:  # the batch goes on meanwhile, so the next burst carries more; the end comes at once
                        with contextlib.suppress(asyncio.TimeoutError):  # wait_for, not asyncio.timeout: Python 3.10
                            await asyncio.wait_for(wake.wait(), WRITE_INTERVAL_S)
                if last is END:
                    break
                if last is not None:
                    raise last
        finally:
            del self._streams[wake]
            request.cancel()
        yield replica.index, [reply.finish() for reply in replies]

    def stop_generating(self):
        """End every request at its next step with ServerStopping and refuse new ones, so a stopping server answers
        its clients instead of making them wait out their generations. Call it on the event loop's thread."""
        self.stopping = True
        for wake, ready in self._streams.items():
            ready.append(ServerStopping("the server is shutting down"))
            wake.set()

    def close(self):
        """Stop every replica's batch thread."""
        for replica in self.replicas:
            replica.close()


class ConversationLog:
    """Appends one JSON line per finished request to a file readable by its owner only (it holds what users
    wrote). A failed write never costs a user the reply: the first is logged, later ones only counted."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self.failures = 0
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))  # a bad path fails at startup

    def write(self, record):
        try:
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (valid in JSON, not in UTF-8): escaped, it round-trips exactly
            data = (json.dumps(record) + "\n").encode("ascii")
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data)  # one write of an O_APPEND file: lines never interleave
                finally:
                    os.close(fd)
        except OSError as e:
            self.failures += 1
            if self.failures == 1:
                logger.error("Could not write the conversation log %s (%s); serving on without it, and this is "
                             "reported once", self.path, e)


# -----------------------------------------------------------------------------
# The app


def _sse(obj):
    # Raw UTF-8 (ensure_ascii=False): the client decodes the stream as UTF-8 anyway.
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_body(request, timeout):
    declared = request.headers.get("content-length", "")
    too_large = RequestError(f"Request body is too large. Maximum {MAX_BODY_BYTES} bytes allowed", status=413)
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()

    async def read():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_BODY_BYTES:
                raise too_large

    try:
        await asyncio.wait_for(read(), timeout)  # a client that stops sending must not hold a connection forever
    except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on, asyncio's own class on 3.10
        raise RequestError(f"Request body not received within {timeout:g} s", status=408) from None
    return bytes(body)


async def _unless_disconnected(request, work):
    """Await the coroutine `work` unless the client leaves first: then cancel it (the request's rows leave their
    batch) and return True; else False, or raise work's error."""
    async def gone():  # once the body is read, the server's next message for this request is the client leaving
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if not task.cancelled():
        task.result()
    return task.cancelled()


def _error_body(path, status, message, param=None, code=None):
    """The error as each API's clients read it: OpenAI's {"error": {...}} under /v1, else {"detail": message}."""
    if path.startswith("/v1/"):
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"detail": message}


def create_app(pool, tokenizer, defaults, model_id="nanochat", conversation_log=None, api_key=None, cors_origins=(),
               body_timeout=30.0):
    """The FastAPI app. defaults: SamplingParams for what a request omits; conversation_log: a ConversationLog or
    None; api_key: the bearer token the chat endpoints and /v1/models want (None = open); cors_origins: web origins
    whose pages may call the API; body_timeout: seconds a client has to send its request body."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()  # the batch threads end with the server

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.pool = pool
    if cors_origins:
        # Only the named origins: a page from anywhere else must not drive the model and read its replies.
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    limits = {"max_messages": serving.MAX_MESSAGES, "max_message_chars": serving.MAX_MESSAGE_CHARS,
              "max_total_chars": serving.MAX_TOTAL_CHARS}  # the UI leaves out the oldest turns to keep to them
    ui_html = (PACKAGE_DIR / "ui.html").read_text(encoding="utf-8").replace("__NANOCHAT_LIMITS__", json.dumps(limits))
    logo_svg = (PACKAGE_DIR / "logo.svg").read_text(encoding="utf-8")
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(request, err):
        headers = {"www-authenticate": "Bearer"} if err.status == 401 else {}
        if err.status in (408, 413):  # the body was not read to its end: this connection cannot carry another request
            headers["connection"] = "close"
        body = _error_body(request.url.path, err.status, str(err), err.param, err.code)
        return JSONResponse(body, status_code=err.status, headers=headers)

    def check_key(request):
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError("Missing or incorrect API key: send it as 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        return JSONResponse(_error_body(request.url.path, err.status_code, str(err.detail)), status_code=err.status_code)

    async def prepare(request, endpoint, openai):
        chat = parse_chat_request(decode_json_body(await _read_body(request, body_timeout)), defaults, openai=openai)
        prompt = build_prompt(tokenizer, chat.messages, pool.context_len, reply_room(chat.max_tokens, pool.context_len))
        params = chat.sampling(prompt.max_new_tokens(chat.max_tokens))
        logger.info("%s: %d messages (%d dropped to fit the context), %d prompt tokens, temperature %g, top-k %d, "
                    "top-p %g, up to %d new tokens, seed %d, n %d", endpoint, len(chat.messages), prompt.dropped,
                    len(prompt.tokens), params.temperature, params.top_k, params.top_p, params.max_tokens, params.seed,
                    params.n)
        return chat, prompt, params

    def finished(endpoint, chat, prompt, params, replies, disconnected, t0):
        seconds, tokens = time.perf_counter() - t0, sum(len(r.tokens) for r in replies)
        logger.info("%s: %s after %d tokens in %.2f s", endpoint, "client disconnected" if disconnected else
                    "/".join(r.finish_reason or "unfinished" for r in replies), tokens, seconds)
        if conversation_log is not None:
            conversation_log.write({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "endpoint": endpoint, "messages": chat.messages,
                "replies": [r.text for r in replies], "finish_reasons": [r.finish_reason for r in replies],
                "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "seed": params.seed,
                "max_tokens": params.max_tokens, "prompt_tokens": len(prompt.tokens), "completion_tokens": tokens,
                "dropped_messages": prompt.dropped, "disconnected": disconnected, "seconds": round(seconds, 3)})

    def event_stream(endpoint, chat, prompt, params, replies, first, burst, last, error):
        """The server-sent events of a streamed request: the strings in `first`, burst(worker, texts) per burst of
        new text (None: nothing to send), then last(). An error after the 200 has gone out is told in the stream as
        error(message)."""
        async def events():
            t0, done = time.perf_counter(), False
            try:
                for event in first:
                    yield event
                async with contextlib.aclosing(pool.generate(prompt.tokens, params, replies)) as bursts:
                    async for worker, texts in bursts:
                        if (event := burst(worker, texts)) is not None:
                            yield event  # one write for every token this stream got since its last one
                yield last()
                done = True
            except ServerStopping:
                yield error("the server is shutting down; try again later")
                done = True
            except Exception:
                logger.exception("generation failed")  # the 200 and the headers are gone: say so in the stream
                yield error("generation failed on the server; see its log")
                done = True
            finally:
                finished(endpoint, chat, prompt, params, replies, not done, t0)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/")
    async def index():
        return HTMLResponse(ui_html)

    @app.get("/logo.svg")
    async def logo():
        return Response(logo_svg, media_type="image/svg+xml")

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": len(pool.replicas) > 0, "num_gpus": len(pool.replicas),
                "available_workers": pool.available()}

    @app.get("/stats")
    async def stats():
        # A worker is busy when a new request would have to wait: its batch is full or has a queue.
        workers, available = pool.workers(), pool.available()
        return {"total_workers": len(pool.replicas), "available_workers": available,
                "busy_workers": len(pool.replicas) - available, "active_rows": sum(w["active_rows"] for w in workers),
                "queued_requests": sum(w["queued_requests"] for w in workers), "workers": workers}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)  # the UI's endpoint drives the model as /v1 does: the key guards both or neither
        chat, prompt, params = await prepare(request, "/chat/completions", openai=False)
        notice = [_sse({"notice": f"The {prompt.dropped} oldest messages were left out to fit the model's context "
                                  f"of {prompt.context_len} tokens.", "dropped_messages": prompt.dropped})]
        # The UI gets the calculator's tokens by name and sends them back as they are (see Reply).
        return event_stream("/chat/completions", chat, prompt, params, [Reply(tokenizer, tools="raw")],
                            notice if prompt.dropped else [],
                            lambda worker, texts: _sse({"token": texts[0], "gpu": worker}) if texts[0] else None,
                            lambda: _sse({"done": True}), lambda message: _sse({"error": message}))

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        check_key(request)
        endpoint = "/v1/chat/completions"
        chat, prompt, params = await prepare(request, endpoint, openai=True)
        replies = [Reply(tokenizer, tools="readable", stop=chat.stop) for _ in range(chat.n)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id,
                "system_fingerprint": None}

        def usage():
            completion = sum(len(r.tokens) for r in replies)
            return {"prompt_tokens": len(prompt.tokens), "completion_tokens": completion,
                    "total_tokens": len(prompt.tokens) + completion}

        if not chat.stream:
            async def generate():
                async for _ in pool.generate(prompt.tokens, params, replies):
                    pass

            t0, disconnected = time.perf_counter(), False
            try:
                # Nothing is sent until the reply is whole, so watch the connection: a client gone stops its rows.
                disconnected = await _unless_disconnected(request, generate())
            except ServerStopping as e:
                raise RequestError(f"{e}; try again later", status=503) from None
            except Exception:
                logger.exception("generation failed")
                raise RequestError("generation failed on the server; see its log", status=500) from None
            finally:
                finished(endpoint, chat, prompt, params, replies, disconnected, t0)
            if disconnected:
                return Response(status_code=499)  # nobody reads it: the connection is gone
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                        "finish_reason": r.finish_reason} for i, r in enumerate(replies)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage()}

        head_chunk = {**head, "object": "chat.completion.chunk"}
        reported = set()

        def burst(worker, texts):
            choices = []
            for i, (reply, text) in enumerate(zip(replies, texts, strict=True)):
                ended = reply.done and i not in reported
                if text or ended:
                    choices.append({"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                                    "finish_reason": reply.finish_reason if ended else None})
                if ended:
                    reported.add(i)
            return _sse({**head_chunk, "choices": choices}) if choices else None

        def last():  # usage lets a client count tokens: one event may carry several
            tail = _sse({**head_chunk, "choices": [], "usage": usage()}) if chat.include_usage else ""
            return tail + "data: [DONE]\n\n"

        role = _sse({**head_chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None} for i in range(chat.n)]})
        return event_stream(endpoint, chat, prompt, params, replies, [role], burst, last,
                            lambda message: _sse(_error_body(endpoint, 500, message)))

    return app


# -----------------------------------------------------------------------------
# The HTTP server


class _TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, closed when a request's headers take over `header_timeout` seconds: uvicorn
    times only the idle wait between requests, so a client sending a byte now and then would hold it forever."""

    def __init__(self, *args, header_timeout, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self._header_timer = header_timeout, None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def data_received(self, data):
        if self._header_timer is None and self.conn.their_state is h11.IDLE:  # the first bytes of the next request
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)
        super().data_received(data)
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc):
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _headers_too_slow(self):
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closed a connection whose request headers took over %g s", self.header_timeout)
            self.transport.close()


class ChatServer(uvicorn.Server):
    """A uvicorn server that, asked to stop, first ends the running generations (their clients hear why): shutting
    down takes one model step, not the longest reply."""

    def __init__(self, config, pool):
        super().__init__(config)
        self.pool = pool

    async def startup(self, sockets=None):
        await super().startup(sockets)
        for server in self.servers:  # the address bound, port 0 resolved
            for sock in server.sockets:
                logger.info("%s", serving_line(*sock.getsockname()[:2]))

    async def shutdown(self, sockets=None):
        self.pool.stop_generating()
        await super().shutdown(sockets)


def serving_line(host, port):
    """The startup line for a bound address: where to point a browser, and who else can connect."""
    everywhere = host in ("0.0.0.0", "::")
    local = "127.0.0.1" if everywhere else host
    where = (f"listening on every network interface ({host}): other machines can connect" if everywhere
             else f"listening on {host} only")
    return f"Chat in a browser at http://{local}:{port}, or point an OpenAI client at http://{local}:{port}/v1 ({where})"


def make_server(app, host="127.0.0.1", port=8000, client_timeout=30.0, max_connections=2048, shutdown_timeout=10.0):
    """A ChatServer (not yet running) for create_app's app; the timeouts and the limit are chat_web's flags."""
    protocol = functools.partial(_TimedH11Protocol, header_timeout=client_timeout)
    # log_config=None: uvicorn's loggers go through the one logging setup of this process.
    config = uvicorn.Config(app, host=host, port=port, http=protocol, log_config=None, limit_concurrency=max_connections,
                            timeout_graceful_shutdown=shutdown_timeout)
    return ChatServer(config, app.state.pool)
