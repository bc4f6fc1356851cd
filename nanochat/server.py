"""
The chat web server: the UI, nanochat's streaming endpoint and an OpenAI-compatible API, in front of a pool of
model replicas. `python -m scripts.chat_web` loads the replicas and runs this app with uvicorn.

    GET  /                     the chat UI (nanochat/ui.html)
    GET  /logo.svg             the logo (favicon)
    POST /chat/completions     {"messages": [...], "temperature", "top_k", "max_tokens"} -> server-sent events
                               data: {"token": "...", "gpu": 0} ... data: {"done": true}
    GET  /health, GET /stats   readiness, worker counts, rows in the running batches and requests waiting
    POST /v1/chat/completions  OpenAI chat completions, streaming or not
    GET  /v1/models            the one model served

    app = create_app(ReplicaPool([Replica(model, tokenizer, max_batch=16)]), tokenizer, SamplingParams(),
                     model_id="nanochat-sft-d20")

Every request is checked against the limits in nanochat/serving.py before it waits for a replica; a bad one gets a
4xx with a JSON message ({"detail": ...}, or OpenAI's {"error": {...}} under /v1).
"""

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.batching import END
from nanochat.serving import (MAX_BODY_BYTES, Reply, RequestError, advance, build_prompt, decode_json_body, parse_chat_request,
                              reply_room)

logger = logging.getLogger(__name__)

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# Replicas


class ReplicaPool:
    """Model replicas (nanochat.serving.Replica), each running a continuous batch of requests, for the event loop.

    `generate` is the whole contract the HTTP layer relies on: (prompt tokens, SamplingParams) in, token columns
    out, and closing the stream cancels the request, whose rows leave their batch before its next step. A request
    goes to the replica with the fewest rows in use or waiting. Each replica's batch computes on its own thread, so
    the event loop keeps serving other clients (and noticing disconnects) meanwhile.
    """

    def __init__(self, replicas):
        self.replicas = list(replicas)
        if not self.replicas:
            raise ValueError("a ReplicaPool needs at least one replica")

    @property
    def context_len(self):
        return self.replicas[0].context_len

    def workers(self):
        """Per replica: {"gpu_id", "device", "max_batch", "active_rows", "running_requests", "queued_requests"}."""
        return [{"gpu_id": r.index, "device": r.device, **r.scheduler.stats()} for r in self.replicas]

    def available(self):
        """Replicas that would start a new one-sample request at once: a free row and nobody waiting."""
        return sum(1 for w in self.workers() if w["active_rows"] < w["max_batch"] and not w["queued_requests"])

    def _load(self, replica):
        stats = replica.scheduler.stats()
        return stats["active_rows"] + stats["queued_requests"]

    async def generate(self, prompt_tokens, params):
        """Yield (worker id, token column) per step for one request, once it has joined a replica's batch.

        Closing this generator (every sample is done, or the client went away) cancels the request: its rows leave
        the batch after the step in flight.
        """
        replica = min(self.replicas, key=self._load)
        loop = asyncio.get_running_loop()
        columns = asyncio.Queue()

        def deliver(item):  # on the batch's thread
            try:
                loop.call_soon_threadsafe(columns.put_nowait, item)
            except RuntimeError:  # the loop is closed: the server is gone, and nobody waits for this
                logger.debug("event loop closed before a request on worker %d ended", replica.index)

        request = replica.submit(prompt_tokens, params, deliver=deliver)
        try:
            while (item := await columns.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                yield replica.index, item
        finally:
            request.cancel()

    def close(self):
        """Stop every replica's batch thread."""
        for replica in self.replicas:
            replica.close()


async def run_replies(pool, prompt, params, replies):
    """Drive `replies` (one Reply per sample) from the pool; yields (worker id, [new text per sample]) per step,
    and finally the text each reply still held back. Stops generating as soon as every reply is done."""
    worker = None
    async with contextlib.aclosing(pool.generate(prompt.tokens, params)) as steps:
        async for worker, column in steps:
            yield worker, advance(replies, column)
            if all(reply.done for reply in replies):
                break
    yield worker, [reply.finish() for reply in replies]


# -----------------------------------------------------------------------------
# Conversation log


class ConversationLog:
    """Appends one JSON line per finished request (messages, replies, sampling settings) to a file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)

    def write(self, record):
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def _record(endpoint, chat, prompt, params, replies, disconnected, seconds):
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "endpoint": endpoint, "messages": chat.messages,
            "replies": [r.text for r in replies], "finish_reasons": [r.finish_reason for r in replies],
            "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "seed": params.seed,
            "max_tokens": params.max_tokens, "prompt_tokens": len(prompt.tokens),
            "completion_tokens": sum(len(r.tokens) for r in replies), "dropped_messages": prompt.dropped,
            "disconnected": disconnected, "seconds": round(seconds, 3)}


# -----------------------------------------------------------------------------
# The app


def _sse(obj):
    # Raw UTF-8 (ensure_ascii=False): the client decodes the stream as UTF-8 anyway.
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_body(request):
    declared = request.headers.get("content-length", "")
    too_large = RequestError(f"Request body is too large. Maximum {MAX_BODY_BYTES} bytes allowed", status=413)
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def _error_body(path, message, param=None, kind="invalid_request_error"):
    if path.startswith("/v1/"):
        return {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return {"detail": message}


def create_app(pool, tokenizer, defaults, model_id="nanochat", conversation_log=None):
    """The FastAPI app. defaults: SamplingParams whose temperature / top_k / max_tokens fill what a request omits;
    conversation_log: a ConversationLog, or None for no log."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()  # the batch threads end with the server

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.pool = pool
    # Any origin may call the API (a UI served elsewhere, a notebook); no cookies, so no credentials.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    with open(os.path.join(PACKAGE_DIR, "ui.html"), encoding="utf-8") as f:
        ui_html = f.read()
    with open(os.path.join(PACKAGE_DIR, "logo.svg"), encoding="utf-8") as f:
        logo_svg = f.read()
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(request, err):
        return JSONResponse(_error_body(request.url.path, str(err), err.param), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        return JSONResponse(_error_body(request.url.path, str(err.detail)), status_code=err.status_code)

    async def prepare(request, endpoint, openai):
        chat = parse_chat_request(decode_json_body(await _read_body(request)), defaults, openai=openai)
        prompt = build_prompt(tokenizer, chat.messages, pool.context_len, reply_room(chat.max_tokens, pool.context_len))
        params = chat.sampling(prompt.max_new_tokens(chat.max_tokens))
        logger.info("%s: %d messages (%d dropped to fit the context), %d prompt tokens, temperature %g, top-k %d, "
                    "top-p %g, up to %d new tokens, seed %d, n %d", endpoint, len(chat.messages), prompt.dropped,
                    len(prompt.tokens), params.temperature, params.top_k, params.top_p, params.max_tokens, params.seed,
                    params.n)
        return chat, prompt, params

    def finished(endpoint, chat, prompt, params, replies, disconnected, t0):
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.tokens) for r in replies)
        logger.info("%s: %s after %d tokens in %.2f s", endpoint, "client disconnected" if disconnected else
                    "/".join(r.finish_reason for r in replies), tokens, seconds)
        if conversation_log is not None:
            conversation_log.write(_record(endpoint, chat, prompt, params, replies, disconnected, seconds))

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
        workers = pool.workers()
        available = pool.available()
        return {"total_workers": len(pool.replicas), "available_workers": available,
                "busy_workers": len(pool.replicas) - available, "active_rows": sum(w["active_rows"] for w in workers),
                "queued_requests": sum(w["queued_requests"] for w in workers), "workers": workers}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        chat, prompt, params = await prepare(request, "/chat/completions", openai=False)

        async def events():
            # The UI gets the calculator's tokens by name and sends them back as they are (see Reply).
            replies, t0, done = [Reply(tokenizer, tools="raw")], time.perf_counter(), False
            try:
                if prompt.dropped:
                    yield _sse({"notice": f"The {prompt.dropped} oldest messages were left out to fit the model's "
                                          f"context of {prompt.context_len} tokens.", "dropped_messages": prompt.dropped})
                async for worker, texts in run_replies(pool, prompt, params, replies):
                    if texts[0]:
                        yield _sse({"token": texts[0], "gpu": worker})
                yield _sse({"done": True})
                done = True
            except Exception:
                # The 200 and the headers are gone already: say so in the stream, and log the traceback.
                logger.exception("generation failed")
                yield _sse({"error": "generation failed on the server; see its log"})
                done = True
            finally:
                finished("/chat/completions", chat, prompt, params, replies, not done, t0)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        chat, prompt, params = await prepare(request, "/v1/chat/completions", openai=True)
        replies = [Reply(tokenizer, tools="readable", stop=chat.stop) for _ in range(chat.n)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id,
                "system_fingerprint": None}

        def usage():
            completion = sum(len(r.tokens) for r in replies)
            return {"prompt_tokens": len(prompt.tokens), "completion_tokens": completion,
                    "total_tokens": len(prompt.tokens) + completion}

        if not chat.stream:
            t0 = time.perf_counter()
            async for _ in run_replies(pool, prompt, params, replies):
                pass
            finished("/v1/chat/completions", chat, prompt, params, replies, False, t0)
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                        "finish_reason": r.finish_reason} for i, r in enumerate(replies)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage()}

        def chunk(choices, **extra):
            return _sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

        async def chunks():
            t0, done, reported = time.perf_counter(), False, set()
            try:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(chat.n)])
                async for _, texts in run_replies(pool, prompt, params, replies):
                    choices = []
                    for i, (reply, text) in enumerate(zip(replies, texts, strict=True)):
                        ended = reply.done and i not in reported
                        if text or ended:
                            choices.append({"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                                            "finish_reason": reply.finish_reason if ended else None})
                        if ended:
                            reported.add(i)
                    if choices:
                        yield chunk(choices)
                if chat.include_usage:
                    yield chunk([], usage=usage())
                yield "data: [DONE]\n\n"
                done = True
            except Exception:
                logger.exception("generation failed")
                yield _sse({"error": {"message": "generation failed on the server; see its log", "type": "server_error",
                                      "param": None, "code": None}})
                done = True
            finally:
                finished("/v1/chat/completions", chat, prompt, params, replies, not done, t0)

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
