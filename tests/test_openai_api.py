"""The OpenAI-compatible API of scripts/chat_web.py, driven by the official `openai` client against the micro chat
model served on loopback (the `chat_server` fixture): replies, streaming, usage, seeds, stop, n, errors."""

import openai
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

HELLO = [{"role": "user", "content": "Hello, who are you?"}]
HELLO_PROMPT_TOKENS = 1 + 1 + len(HELLO[0]["content"]) + 1 + 1  # BOS, user_start, bytes, user_end, assistant_start


@pytest.fixture(scope="module")
def client(chat_server):
    with openai.OpenAI(base_url=chat_server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60) as c:
        yield c


def test_models_lists_the_served_checkpoint(client):
    assert [m.id for m in client.models.list()] == ["nanochat-sft-d2"]


def test_reply_usage_and_seed(client):
    first = client.chat.completions.create(model="nanochat-sft-d2", messages=HELLO, max_tokens=16, temperature=0.9, seed=7)
    choice = first.choices[0]
    assert first.object == "chat.completion" and first.model == "nanochat-sft-d2" and first.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens == HELLO_PROMPT_TOKENS
    assert 1 <= first.usage.completion_tokens <= 16
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    if choice.finish_reason == "length":
        assert first.usage.completion_tokens == 16
    again = client.chat.completions.create(model="nanochat-sft-d2", messages=HELLO, max_tokens=16, temperature=0.9, seed=7)
    assert again.choices[0].message.content == choice.message.content  # same seed, same sample


def test_streaming_gives_the_same_reply_as_not_streaming(client):
    kwargs = dict(model="nanochat", messages=HELLO, max_tokens=20, temperature=1.0, top_p=0.9, seed=11,
                  extra_body={"top_k": 40})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_string_ends_the_reply_before_it(client):
    kwargs = dict(model="nanochat", messages=HELLO, max_tokens=40, temperature=0.0)
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(text) >= 6, "the greedy reply is too short to cut"
    stop = text[3:5]
    cut = client.chat.completions.create(stop=[stop, "never appears"], **kwargs).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[:text.index(stop)]
    streamed = client.chat.completions.create(stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_n_samples_one_prompt_several_times(client):
    reply = client.chat.completions.create(model="nanochat", messages=HELLO, max_tokens=12, temperature=1.0, n=3, seed=1)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1
    assert reply.usage.prompt_tokens == HELLO_PROMPT_TOKENS


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 2.5}, "Temperature must be between 0.0 and 2.0"),
    ({"top_p": 1.5}, "top_p must be"),
    ({"max_tokens": 0}, "max_tokens must be between 1 and 4096"),
    ({"messages": []}, "At least one message is required"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "Message 0 has invalid role"),
])
def test_bad_requests_raise_the_clients_bad_request_error(client, kwargs, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": "nanochat", "messages": HELLO, **kwargs})
    assert err.value.status_code == 400 and err.value.body["message"].startswith(message)
    assert err.value.body["type"] == "invalid_request_error"
