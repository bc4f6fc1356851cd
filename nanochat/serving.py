"""
What the chat CLI and the web server share: request checks, prompts from messages that fit the model's context,
and generated tokens turned into text as they arrive. Nothing here knows about HTTP (see nanochat/server.py).
"""

import codecs
import json
import math
import secrets
from dataclasses import dataclass

from nanochat.batching import BatchScheduler
from nanochat.checkpoint_manager import add_checkpoint_flags, load_model
from nanochat.common import add_debug_flag
from nanochat.engine import model_device, stop_tokens
from nanochat.tokenizer import fold_system

# -----------------------------------------------------------------------------
# Request limits. They bound what one request can cost a public server (characters to tokenize, tokens to
# generate); the model's context is checked separately, by build_prompt.

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 = no top-k filtering
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
MAX_CHOICES = 8  # OpenAI's `n`: samples share one prefill, but each decodes its own tokens
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # per stop string: a stop longer than any sensible reply only costs the reply streamer time
MAX_BODY_BYTES = 1 << 20  # 32,000 characters JSON-escaped as \uXXXX are ~200 KB; a bigger body is not a chat

ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request that cannot be served as asked, answered with HTTP `status`; the message says which field and what
    is allowed (or, for a 5xx, what went wrong on the server)."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. top_k 0 = off; top_p 1.0 = off; n samples of one prompt."""

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 42
    n: int = 1


@dataclass(frozen=True, kw_only=True)
class ChatRequest(SamplingParams):
    """A checked chat request: messages are {"role", "content": str} dicts, the rest is ready to use."""

    messages: list
    seed: int | None = None  # None: a fresh random seed, so two identical requests get different samples
    stop: tuple = ()
    stream: bool = True
    include_usage: bool = False
    model: str | None = None

    def sampling(self, max_tokens):
        """SamplingParams for this request with the generation budget `max_tokens` (after the context cap)."""
        seed = self.seed if self.seed is not None else secrets.randbelow(2**31)
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, max_tokens=max_tokens,
                              seed=seed, n=self.n)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    # An int is exact at any size (math.isfinite would overflow converting a 400-digit one to float).
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def decode_json_body(body):
    """The JSON object in a request body (bytes, at most MAX_BODY_BYTES); RequestError for anything else."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise RequestError("Request body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers past Python's 4,300-digit limit
        raise RequestError(f"Request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(f"Request body must be a JSON object, got {type(data).__name__}")
    return data


def _content_text(i, content, text_parts):
    """The text of message i's content: a str, or (OpenAI API) a list of {"type": "text", "text": str} parts."""
    if isinstance(content, str):
        return content
    if text_parts and isinstance(content, list):
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise RequestError(f"Message {i} has content parts that are not text; only text content is supported",
                           param=f"messages[{i}].content")
    kinds = "a string or a list of text parts" if text_parts else "a string"
    raise RequestError(f"Message {i} has invalid content type {type(content).__name__}. Must be {kinds}",
                       param=f"messages[{i}].content")


def _check_messages(messages, text_parts):
    if messages is None or (isinstance(messages, list) and not messages):
        raise RequestError("At least one message is required", param="messages")
    if not isinstance(messages, list):
        raise RequestError(f"messages must be a list, got {type(messages).__name__}", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"Too many messages. Maximum {MAX_MESSAGES} messages allowed per request", param="messages")
    checked, total = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"Message {i} must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"Message {i} has invalid role. Must be 'user', 'assistant', or 'system'",
                               param=f"messages[{i}].role")
        if role == "system" and i != 0:
            raise RequestError(f"Message {i} is a system message; only the first message may be one",
                               param=f"messages[{i}].role")
        text = _content_text(i, message.get("content"), text_parts)
        if not text:
            raise RequestError(f"Message {i} has empty content", param=f"messages[{i}].content")
        if len(text) > MAX_MESSAGE_CHARS:
            raise RequestError(f"Message {i} is too long. Maximum {MAX_MESSAGE_CHARS} characters allowed per message",
                               param=f"messages[{i}].content")
        total += len(text)
        checked.append({"role": role, "content": text})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"Total conversation is too long. Maximum {MAX_TOTAL_CHARS} characters allowed",
                           param="messages")
    if checked[0]["role"] == "system" and (len(checked) < 2 or checked[1]["role"] != "user"):
        # fold_system puts the system text in front of the first user message, in training and here.
        raise RequestError("A system message must be followed by a user message", param="messages")
    return checked


def _number(data, name, default, low, high, integer=False, message=None):
    value = data.get(name)
    if value is None:
        return default
    ok = _is_int(value) if integer else _is_number(value)
    if not ok or not low <= value <= high:
        raise RequestError(message or f"{name} must be {'an integer' if integer else 'a number'} between {low} and {high}",
                           param=name)
    return int(value) if integer else float(value)


def parse_chat_request(data, defaults, openai=False):
    """A ChatRequest from a decoded JSON request, or RequestError. defaults: SamplingParams for the fields left out;
    openai: also the OpenAI API's fields (top_p, seed, stop, n, stream, max_completion_tokens, text parts).
    Out-of-range values are rejected, never clamped: a client should learn its request was not what it asked."""
    messages = _check_messages(data.get("messages"), text_parts=openai)
    temperature = _number(data, "temperature", defaults.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE,
                          message=f"Temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}")
    top_k = _number(data, "top_k", defaults.top_k, MIN_TOP_K, MAX_TOP_K, integer=True,
                    message=f"top_k must be between {MIN_TOP_K} and {MAX_TOP_K}")
    max_name = "max_completion_tokens" if openai and data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(data, max_name, defaults.max_tokens, MIN_MAX_TOKENS, MAX_MAX_TOKENS, integer=True,
                         message=f"{max_name} must be between {MIN_MAX_TOKENS} and {MAX_MAX_TOKENS}")
    request = {"messages": messages, "temperature": temperature, "top_k": top_k, "max_tokens": max_tokens}
    if not openai:
        return ChatRequest(**request)

    top_p = data.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise RequestError("top_p must be a number greater than 0 and at most 1", param="top_p")
    request["top_p"] = 1.0 if top_p is None else float(top_p)
    request["seed"] = _number(data, "seed", None, 0, 2**63 - 1, integer=True)
    request["n"] = _number(data, "n", 1, 1, MAX_CHOICES, integer=True)
    stop = data.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                               param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise RequestError(f"stop strings must be at most {MAX_STOP_CHARS} characters each", param="stop")
        request["stop"] = tuple(stops)
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream must be true or false", param="stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    return ChatRequest(**request, stream=bool(stream), include_usage=options.get("include_usage") is True, model=model)


# -----------------------------------------------------------------------------
# Prompts


class ContextOverflowError(RequestError):
    """The newest message alone does not leave room for a reply in the model's context."""


@dataclass
class Prompt:
    """Prompt ids for the next assistant turn, how many leading messages had to go, and the context size."""

    tokens: list
    dropped: int
    context_len: int

    def max_new_tokens(self, max_tokens):
        """The generation budget: what was asked, capped so that prompt + reply never exceed the context."""
        return max(0, min(max_tokens, self.context_len - len(self.tokens)))


def reply_room(max_tokens, context_len):
    """Tokens a prompt must leave free for the reply."""
    return min(max_tokens, context_len // 2)  # at most half: a long max_tokens never pushes a whole conversation out


def build_prompt(tokenizer, messages, context_len, reply_room):
    """The Prompt [BOS, turn, ..., <|assistant_start|>] for `messages` ({"role", "content"} dicts), the oldest
    turns dropped until `reply_room` tokens of `context_len` stay free; ContextOverflowError if the last user
    message and what follows it do not fit."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else list(messages)
    budget = context_len - reply_room
    bos, assistant_start = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_start|>")

    def render(role, content):
        return tokenizer.render_message(role, content, tool_names=True)[0]

    encoded = [render(m["role"], m["content"]) for m in turns]
    # suffix[k]: tokens of turns k..end, so every cut point is tried in O(1) after one pass.
    suffix = [0] * (len(turns) + 1)
    for k in range(len(turns) - 1, -1, -1):
        suffix[k] = suffix[k + 1] + len(encoded[k])
    starts = [0] + [k for k, m in enumerate(turns) if m["role"] == "user" and k > 0]  # whole turns: start at a user
    for k in starts:
        first = encoded[k]
        if system is not None and turns[k]["role"] == "user":
            first = render("user", fold_system(system, turns[k]["content"]))  # the system text is never dropped
        if 1 + len(first) + suffix[k + 1] + 1 <= budget:
            return Prompt([bos, *first, *[t for ids in encoded[k + 1:] for t in ids], assistant_start], k, context_len)
    if system is not None and 1 + len(render("user", fold_system(system, ""))) + 1 > budget:
        last, what = 0, "Message 0 (the system message)"
    else:
        last = starts[-1] + (1 if system is not None else 0)
        what = f"Message {last}"
    raise ContextOverflowError(f"{what} is too long for this model's context of {context_len} tokens (with "
                               f"{reply_room} kept free for the reply); shorten it", param=f"messages[{last}].content")


# -----------------------------------------------------------------------------
# Generated tokens -> text


class Reply:
    """One sample's reply as it is generated: push(token) returns the text to show now. tools="readable" shows a
    calculator call as "[calculator: 12/60 = 0.2]", "raw" keeps the token names (build_prompt reads them back).
    done, finish_reason ("stop"/"length"), tokens (all generated) and text (all returned) describe the reply."""

    def __init__(self, tokenizer, tools="readable", stop=()):
        if tools not in ("readable", "raw"):
            raise ValueError(f"tools must be 'readable' or 'raw', got {tools!r}")
        self.tokenizer, self.tools, self.stop = tokenizer, tools, tuple(s for s in stop if s)
        self.ends = stop_tokens(tokenizer, other_turns=True)
        self.names = {tokenizer.encode_special(name): name for name in tokenizer.get_special_tokens()}
        self.tokens, self.text = [], ""
        self.done, self.finish_reason = False, None
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a split character shows once whole
        self._held = ""  # text that might begin a stop string: it is shown once decided, never past a stop
        # Per stop string: its KMP failure table, and how many of its first characters the text now ends with.
        # Matching one character at a time keeps the check linear in the text, whatever the stop's length.
        self._fail = [_failure_table(s) for s in self.stop]
        self._matched = [0] * len(self.stop)
        self._tool = None  # readable mode: None, "python", "after_python" or "output"

    def push(self, token):
        """Add one generated token; returns the text to show now ("" while waiting for more)."""
        if self.done:
            return ""
        self.tokens.append(token)
        if token in self.ends:
            return self.finish("stop")
        return self._emit(self._decode(token))

    def finish(self, reason="length"):
        """End the reply (the budget ran out, or generation stopped); returns the text still held back."""
        if self.done:
            return ""
        unclosed = "]" if self._tool is not None else ""  # a calculator call cut off (only readable mode opens one)
        self._tool = None
        text = self._emit(self._bytes.decode(b"", final=True) + unclosed, final=True)
        if not self.done:  # else the tail held a stop string, and _emit has ended the reply with "stop"
            self.done, self.finish_reason = True, reason
        return text

    def _decode(self, token):
        name = self.names.get(token)
        if name is None:
            text = self._bytes.decode(self.tokenizer.decode_single_token_bytes(token))
            if self._tool == "after_python":  # the call got no output (the calculator refused it)
                self._tool = None
                text = "]" + text
            return text
        text = self._bytes.decode(b"", final=True)  # a special token ends any unfinished character
        if self.tools == "raw":
            return text + name
        return text + self._readable(name)

    def _readable(self, name):
        state, text = self._tool, ""
        if state == "after_python" and name != "<|output_start|>":
            state, text = None, "]"
        unclosed = "]" if state in ("python", "output") else ""  # a new call first closes one left open
        if name == "<|python_start|>":
            text += unclosed + "[calculator: "
            self._tool = "python"
        elif name == "<|python_end|>" and state == "python":
            self._tool = "after_python"
        elif name == "<|output_start|>":
            text += " = " if state == "after_python" else unclosed + "[calculator output: "
            self._tool = "output"
        elif name == "<|output_end|>" and state == "output":
            text += "]"
            self._tool = None
        else:
            self._tool = state
        return text

    def _emit(self, text, final=False):
        if not self.stop:
            self.text += text
            return text
        buffer = self._held + text
        end = self._find_stop(text)
        if end is not None:  # the reply ends before the first stop string to complete
            out, self._held = buffer[:len(self._held) + end], ""
            self.done, self.finish_reason = True, "stop"
        elif final:
            out, self._held = buffer, ""
        else:
            keep = max(self._matched)  # the longest tail that could still grow into a stop string
            out, self._held = buffer[:len(buffer) - keep], buffer[len(buffer) - keep:]
        self.text += out
        return out

    def _find_stop(self, text):
        """Where in `text` the first stop string to complete starts (negative: in the held-back text), or None."""
        for at, char in enumerate(text):
            ends = []
            for i, (stop, fail) in enumerate(zip(self.stop, self._fail, strict=True)):
                k = self._matched[i]
                while k and stop[k] != char:
                    k = fail[k - 1]
                k += stop[k] == char
                if k == len(stop):
                    ends.append(at + 1 - k)
                    k = fail[k - 1]
                self._matched[i] = k
            if ends:
                return min(ends)
        return None


def _failure_table(s):
    """KMP: fail[i] = the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        k += s[i] == s[k]
        fail[i] = k
    return fail


class Replica:
    """One model on one device and the continuous batch (nanochat.batching.BatchScheduler) its requests share;
    max_batch 1 serves one request at a time."""

    def __init__(self, model, tokenizer, index=0, max_batch=1):
        self.model, self.tokenizer, self.index = model, tokenizer, index
        self.scheduler = BatchScheduler(model, tokenizer, max_batch=max_batch)
        # A row stops at any token that ends a reply (see Reply), so it frees its slot without waiting for the
        # reader to notice and cancel.
        self.stop_tokens = stop_tokens(tokenizer, other_turns=True)
        self.device, self.context_len = str(model_device(model)), model.config.sequence_len

    def submit(self, prompt_tokens, params, deliver=None):
        """Queue one request (SamplingParams); returns its batching.Request. deliver: called on the batch's thread
        with each token column (a token per sample), then batching.END or the error."""
        return self.scheduler.submit(prompt_tokens, max_tokens=params.max_tokens, temperature=params.temperature,
                                     top_k=params.top_k or None, top_p=params.top_p, seed=params.seed,
                                     num_samples=params.n, stop_tokens=self.stop_tokens, deliver=deliver)

    def generate(self, prompt_tokens, params):
        """Token columns (a token per sample) until every sample has ended; closing the generator stops it."""
        yield from self.submit(prompt_tokens, params)

    def close(self):
        """Stop the batch's thread (requests still running end with an error)."""
        self.scheduler.close()


# -----------------------------------------------------------------------------
# What the chat CLI and the web server's command lines share


def add_model_flags(parser):
    """-i/--source, -g/--model-tag, -s/--step, --device-type and --debug: which checkpoint to chat with, and where."""
    group = parser.add_argument_group("model")
    add_checkpoint_flags(group, default="sft")
    group.add_argument("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    add_debug_flag(parser)
    return parser


def sampling_flag_problems(args):
    """What is wrong with -t/--temperature, -k/--top-k and -m/--max-tokens: the request limits hold for them too."""
    checks = (("--temperature", args.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE),
              ("--top-k", args.top_k, MIN_TOP_K, MAX_TOP_K), ("--max-tokens", args.max_tokens, MIN_MAX_TOKENS, MAX_MAX_TOKENS))
    return [f"{flag} must be between {low} and {high}, got {value}" for flag, value, low, high in checks
            if not low <= value <= high]


def load_replica(args, device, index=0, max_batch=1):
    """(Replica, checkpoint meta) of the checkpoint add_model_flags' flags name, on `device`."""
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    return Replica(model, tokenizer, index=index, max_batch=max_batch), meta
