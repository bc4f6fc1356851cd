"""Every request limit of nanochat/serving.py at its edge, over real HTTP on loopback (the `chat_server` fixture):
a request exactly at the limit is served (200), one step past it gets a 4xx whose JSON message names the limit.
For a float limit, one step is the next float (math.nextafter), or at 0 the smallest normal float: tests that
train in this process flush denormals to zero (nanochat.training), and the CPU then reads 5e-324 as 0."""

import json
import math
import sys

import httpx
import pytest

from nanochat import serving

pytestmark = pytest.mark.usefixtures("one_thread")

UI, API = "/chat/completions", "/v1/chat/completions"
HI = {"role": "user", "content": "hi"}


def _msgs(count):
    return [HI] * count


def _long_message(chars):
    # An old assistant turn of `chars` characters; the server drops it to fit the micro model's context.
    return [HI, {"role": "assistant", "content": "y" * chars}, HI]


def _total(chars):
    # Messages of at most MAX_MESSAGE_CHARS adding up to `chars` characters, the last a short user message.
    per = serving.MAX_MESSAGE_CHARS
    body, left = [], chars - 2
    while left:
        body.append({"role": "user" if len(body) % 2 == 0 else "assistant", "content": "z" * min(per, left)})
        left -= min(per, left)
    return [*body, HI]


# name, endpoints, (fields at the limit), (fields one past it), what the error names
LIMITS = [
    ("messages", (UI, API), {"messages": _msgs(serving.MAX_MESSAGES)}, {"messages": _msgs(serving.MAX_MESSAGES + 1)},
     f"Maximum {serving.MAX_MESSAGES} messages"),
    ("message chars", (UI, API), {"messages": _long_message(serving.MAX_MESSAGE_CHARS)},
     {"messages": _long_message(serving.MAX_MESSAGE_CHARS + 1)}, f"Maximum {serving.MAX_MESSAGE_CHARS} characters"),
    ("total chars", (UI, API), {"messages": _total(serving.MAX_TOTAL_CHARS)},
     {"messages": _total(serving.MAX_TOTAL_CHARS + 1)}, f"Maximum {serving.MAX_TOTAL_CHARS} characters"),
    ("temperature high", (UI, API), {"temperature": serving.MAX_TEMPERATURE},
     {"temperature": math.nextafter(serving.MAX_TEMPERATURE, math.inf)}, f"and {serving.MAX_TEMPERATURE}"),
    ("temperature low", (UI, API), {"temperature": serving.MIN_TEMPERATURE},
     {"temperature": serving.MIN_TEMPERATURE - sys.float_info.min}, f"between {serving.MIN_TEMPERATURE}"),
    ("top_k high", (UI, API), {"top_k": serving.MAX_TOP_K}, {"top_k": serving.MAX_TOP_K + 1}, f"and {serving.MAX_TOP_K}"),
    ("top_k low", (UI, API), {"top_k": serving.MIN_TOP_K}, {"top_k": serving.MIN_TOP_K - 1}, f"between {serving.MIN_TOP_K}"),
    ("max_tokens high", (UI, API), {"max_tokens": serving.MAX_MAX_TOKENS}, {"max_tokens": serving.MAX_MAX_TOKENS + 1},
     f"and {serving.MAX_MAX_TOKENS}"),
    ("max_tokens low", (UI, API), {"max_tokens": serving.MIN_MAX_TOKENS}, {"max_tokens": serving.MIN_MAX_TOKENS - 1},
     f"between {serving.MIN_MAX_TOKENS}"),
    ("max_completion_tokens", (API,), {"max_completion_tokens": serving.MAX_MAX_TOKENS},
     {"max_completion_tokens": serving.MAX_MAX_TOKENS + 1}, f"and {serving.MAX_MAX_TOKENS}"),
    ("top_p high", (API,), {"top_p": 1.0}, {"top_p": math.nextafter(1.0, math.inf)}, "at most 1"),
    ("top_p low", (API,), {"top_p": sys.float_info.min}, {"top_p": 0.0}, "greater than 0"),
    ("n", (API,), {"n": serving.MAX_CHOICES}, {"n": serving.MAX_CHOICES + 1}, f"and {serving.MAX_CHOICES}"),
    ("n low", (API,), {"n": 1}, {"n": 0}, "between 1"),
    ("seed high", (API,), {"seed": 2**63 - 1}, {"seed": 2**63}, f"and {2**63 - 1}"),
    ("seed low", (API,), {"seed": 0}, {"seed": -1}, "between 0"),
    ("stop count", (API,), {"stop": ["#"] * serving.MAX_STOP_STRINGS}, {"stop": ["#"] * (serving.MAX_STOP_STRINGS + 1)},
     f"at most {serving.MAX_STOP_STRINGS} non-empty strings"),
    ("stop chars", (API,), {"stop": ["#" * serving.MAX_STOP_CHARS]}, {"stop": ["#" * (serving.MAX_STOP_CHARS + 1)]},
     f"at most {serving.MAX_STOP_CHARS} characters"),
]


def _post(url, endpoint, fields):
    body = {"messages": [HI], "max_tokens": 1, **fields}
    if "max_completion_tokens" in fields:
        del body["max_tokens"]
    # Large max_tokens at the limit still end at once: the context caps them, and a stop string ends most replies.
    return httpx.post(url + endpoint, json=body, timeout=60)


def _message(response, endpoint):
    detail = response.json()
    return detail["error"]["message"] if endpoint == API else detail["detail"]


@pytest.mark.parametrize("name, endpoints, at, past, names", LIMITS, ids=[limit[0] for limit in LIMITS])
def test_each_limit_is_served_at_its_edge_and_refused_one_past_it(chat_server, name, endpoints, at, past, names):
    for endpoint in endpoints:
        served = _post(chat_server.url, endpoint, at)
        assert served.status_code == 200, (endpoint, served.text)
        refused = _post(chat_server.url, endpoint, past)
        assert refused.status_code == 400, (endpoint, refused.text)
        assert names in _message(refused, endpoint), (endpoint, _message(refused, endpoint))


def test_the_body_size_limit_at_its_edge(chat_server):
    body = json.dumps({"messages": [HI], "max_tokens": 1}).encode()
    exactly = body + b" " * (serving.MAX_BODY_BYTES - len(body))  # JSON allows trailing whitespace
    for endpoint in (UI, API):
        served = httpx.post(chat_server.url + endpoint, content=exactly, timeout=60,
                            headers={"content-type": "application/json"})
        assert served.status_code == 200, served.text
        refused = httpx.post(chat_server.url + endpoint, content=exactly + b" ", timeout=60,
                             headers={"content-type": "application/json"})
        assert refused.status_code == 413 and f"Maximum {serving.MAX_BODY_BYTES} bytes" in _message(refused, endpoint)
