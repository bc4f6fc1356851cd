"""The tokenizer wrapper, chat rendering and token_bytes (nanochat/tokenizer.py). Hermetic: throwaway tokenizers."""

import copy
import hashlib
import os
import pickle
import sys
import types

import pytest
import tiktoken
import torch

import nanochat.tokenizer as tokenizer_module
from nanochat.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, CappedTexts, EncodingUnavailableError, RustBPETokenizer,
                                TokenizerNotFoundError, compute_token_bytes, get_token_bytes, get_tokenizer,
                                load_tiktoken_encoding, load_tok_eval_samples, measure_compression,
                                token_bytes_summary)

# Rich enough for all 35 merges of a 300-token vocabulary (upstream once came up short): the vocab size is exact.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello tokenizer, hello hello hello",
    "Numbers like 12345 and unicode like naïve café 你好 🙂 should survive.",
    "def f(x):\n    return x + 1\n",
] * 8
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 35


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(CORPUS), VOCAB_SIZE)


def sid(tok, name):
    return tok.encode_special(name)


# -----------------------------------------------------------------------------
# training, vocabulary, special tokens


def test_vocab_size_is_exact_and_specials_follow_the_merges_in_order(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [sid(tok, name) for name in SPECIAL_TOKENS] == list(range(VOCAB_SIZE - 9, VOCAB_SIZE))
    assert tok.get_bos_token_id() == sid(tok, "<|bos|>") == VOCAB_SIZE - 9
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tok.enc._pat_str == SPLIT_PATTERN


def test_worked_example_merges_and_ids():
    # At count 3, (h,e), (e,l), (l,l), (l,o) tie and the smallest pair (e,l) wins.
    tok = RustBPETokenizer.train_from_iterator(["hello hello hello world world"], 256 + 9 + 4)
    assert [tok.decode_single_token_bytes(i) for i in range(256, 260)] == [b"el", b"hel", b"lo", b"hello"]
    assert tok.encode("hello world") == [259, 32, 119, 111, 114, 108, 100]
    assert sid(tok, "<|bos|>") == 260


def test_too_small_vocab_is_refused():
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(["abc"], 264)


def test_gappy_ranks_are_refused():
    with pytest.raises(ValueError, match="0..N-1"):
        RustBPETokenizer.from_mergeable_ranks({b"a": 0, b"b": 2})


def test_special_names_in_text_stay_plain_text(tok):
    ids = tok.encode("<|bos|>")
    assert len(ids) > 1
    assert not set(ids) & {sid(tok, name) for name in SPECIAL_TOKENS}
    assert tok.decode([sid(tok, "<|assistant_end|>")]) == "<|assistant_end|>"
    assert tok.id_to_token(sid(tok, "<|python_start|>")) == "<|python_start|>"
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|endoftext|>")


@pytest.mark.parametrize("text", ["hello world", "naïve café 你好 🙂", "unseen tokens: zqxjkv", "", "  \n\t tabs\r\n"])
def test_encode_decode_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_prepend_append_take_names_or_ids(tok):
    ids = tok.encode("hello")
    bos, user_end = sid(tok, "<|bos|>"), sid(tok, "<|user_end|>")
    assert tok.encode("hello", prepend="<|bos|>", append="<|user_end|>") == [bos] + ids + [user_end]
    assert tok.encode("hello", prepend=bos, append=user_end) == [bos] + ids + [user_end]
    assert tok("hello", prepend=bos) == [bos] + ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("hello", prepend=VOCAB_SIZE)
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("hello", append="<|eos|>")
    with pytest.raises(ValueError, match="special-token string or an int"):
        tok.encode("hello", prepend=1.0)


def test_batch_encode_matches_single_and_applies_prepend_to_every_row(tok):
    texts = ["hello", "world", "", "The quick brown fox jumps over the lazy dog."]
    rows = tok.encode(texts, num_threads=2)
    assert rows == [tok.encode(t) for t in texts]
    bos = tok.get_bos_token_id()
    assert tok.encode(texts, prepend="<|bos|>", num_threads=1) == [[bos] + tok.encode(t) for t in texts]
    with pytest.raises(ValueError, match="Invalid input type"):
        tok.encode(("a", "b"))
    with pytest.raises(ValueError, match="Invalid input type"):
        tok.encode(["a", 3])


def test_save_and_load_roundtrip(tok, tmp_path):
    path = tok.save(str(tmp_path / "tokenizer"))
    with open(path, "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding) and enc.name == "rustbpe"
    loaded = RustBPETokenizer.from_directory(str(tmp_path / "tokenizer"))
    text = "Numbers like 12345 and 你好 🙂 <|bos|>"
    assert loaded.encode(text) == tok.encode(text)
    assert [sid(loaded, n) for n in SPECIAL_TOKENS] == [sid(tok, n) for n in SPECIAL_TOKENS]
    assert loaded.get_vocab_size() == tok.get_vocab_size()


def test_get_tokenizer_and_token_bytes_missing_say_how_to_make_them(base_dir):
    with pytest.raises(TokenizerNotFoundError, match="python -m scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(TokenizerNotFoundError, match="python -m scripts.tok_train"):
        get_token_bytes()


def test_get_tokenizer_and_token_bytes_load_from_base_dir(tok, base_dir):
    tok.save(str(base_dir / "tokenizer"))
    torch.save(compute_token_bytes(tok), base_dir / "tokenizer" / "token_bytes.pt")
    assert get_tokenizer().encode("hello world") == tok.encode("hello world")
    token_bytes = get_token_bytes("cpu")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)


def test_missing_rustbpe_build_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "rustbpe", types.ModuleType("rustbpe"))
    with pytest.raises(ImportError, match="uv sync"):
        RustBPETokenizer.train_from_iterator(["abc"], 300)


# -----------------------------------------------------------------------------
# token_bytes


def test_token_bytes_count_raw_bytes_of_partial_utf8_tokens():
    # Lots of CJK, so early merges join the first two bytes of a 3-byte character: a token that is
    # not valid UTF-8 on its own. Decoding such a token to str (the pre-Jul-2026 way) gives U+FFFD,
    # 3 bytes, instead of its 2 raw bytes.
    tok = RustBPETokenizer.train_from_iterator(["你好 你们 你说 你是 你在 你看"] * 20, 256 + 9 + 6)
    token_bytes = compute_token_bytes(tok)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (tok.get_vocab_size(),)
    for i in range(tok.get_vocab_size() - 9):
        assert token_bytes[i].item() == len(tok.decode_single_token_bytes(i))
    assert token_bytes[-9:].tolist() == [0] * 9
    assert token_bytes[0xE4].item() == 1  # a lone lead byte is 1 byte, not 3

    def is_utf8(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    partial = [i for i in range(256, tok.get_vocab_size() - 9) if not is_utf8(tok.decode_single_token_bytes(i))]
    assert partial, "the corpus should produce at least one merged token that is an incomplete UTF-8 sequence"
    for i in partial:
        buggy = len(tok.decode([i]).encode("utf-8"))
        assert token_bytes[i].item() == len(tok.decode_single_token_bytes(i)) != buggy


def test_token_bytes_summary_skips_specials():
    stats = token_bytes_summary(torch.tensor([1, 2, 3, 6, 0, 0], dtype=torch.int32))
    assert stats["token_bytes_min"] == 1 and stats["token_bytes_max"] == 6
    assert stats["token_bytes_mean"] == pytest.approx(3.0)
    assert stats["token_bytes_std"] == pytest.approx(torch.tensor([1.0, 2, 3, 6]).std().item())


# -----------------------------------------------------------------------------
# render_conversation / render_for_completion


TOOL_CONVERSATION = {"messages": [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "ok "},
        {"type": "python", "text": "1+1"},
        {"type": "python_output", "text": "2"},
        {"type": "text", "text": " done"},
    ]},
]}


def test_render_golden_ids_and_mask_with_system_and_tool_parts(byte_tokenizer):
    # Byte-level tokenizer: text ids are the UTF-8 bytes; specials are 256 (bos) ... 264 (output_end).
    ids, mask = byte_tokenizer.render_conversation(TOOL_CONVERSATION)
    expected = ([256, 257] + list(b"SYS\n\nhi") + [258, 259] + list(b"ok ") + [261] + list(b"1+1") + [262]
                + [263] + list(b"2") + [264] + list(b" done") + [260])
    expected_mask = ([0, 0] + [0] * 7 + [0, 0] + [1] * 3 + [1] + [1] * 3 + [1]
                     + [0] + [0] + [0] + [1] * 5 + [1])
    assert ids == expected
    assert mask == expected_mask


def test_render_masks_supervise_exactly_the_assistant_turns(tok):
    conversation = {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "later"},
    ]}
    ids, mask = tok.render_conversation(conversation)
    assert len(ids) == len(mask)
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0
    end = sid(tok, "<|assistant_end|>")
    assert [i for i, m in zip(ids, mask) if m == 1] == tok.encode("hello!") + [end] + tok.encode("later") + [end]
    assert all(m == 0 for i, m in zip(ids, mask) if i == sid(tok, "<|user_start|>"))


def test_render_tool_parts_with_trained_tokenizer(tok):
    ids, mask = tok.render_conversation(TOOL_CONVERSATION)
    start, stop = ids.index(sid(tok, "<|output_start|>")), ids.index(sid(tok, "<|output_end|>"))
    assert mask[ids.index(sid(tok, "<|python_start|>"))] == 1
    assert mask[ids.index(sid(tok, "<|python_end|>"))] == 1
    assert set(mask[start:stop + 1]) == {0}
    assert ids[start + 1:stop] == tok.encode("2")


def test_system_message_merges_into_first_user_message_without_mutating_input(tok):
    with_system = {"messages": [{"role": "system", "content": "sys prompt"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "yo"}], "subject": "x"}
    snapshot = copy.deepcopy(with_system)
    merged = {"messages": [{"role": "user", "content": "sys prompt\n\nhi"}, {"role": "assistant", "content": "yo"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert with_system == snapshot


def test_render_truncates_to_max_tokens(tok):
    conversation = {"messages": [{"role": "user", "content": "hello " * 100},
                                 {"role": "assistant", "content": "world " * 100}]}
    ids, mask = tok.render_conversation(conversation, max_tokens=32)
    assert len(ids) == 32 and len(mask) == 32
    full_ids, full_mask = tok.render_conversation(conversation)
    assert len(full_ids) > 32 and (ids, mask) == (full_ids[:32], full_mask[:32])
    with pytest.raises(ValueError, match="max_tokens"):
        tok.render_conversation(conversation, max_tokens=0)


U, A = "user", "assistant"


@pytest.mark.parametrize("conversation,message", [
    ([{"role": U, "content": "hi"}], "dict with a 'messages' list"),
    ({"messages": []}, "no messages"),
    ({"messages": "hi"}, "dict with a 'messages' list"),
    ({"messages": [{"role": U}]}, "Message 0 must be a dict with 'role' and 'content'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "Message 0 has unknown role 'tool'"),
    ({"messages": [{"role": U, "content": "a"}, {"role": "bot", "content": "b"}]}, "Message 1 has unknown role 'bot'"),
    ({"messages": [{"role": A, "content": "a"}]}, "Message 0 is from assistant but should be from user"),
    ({"messages": [{"role": U, "content": "a"}, {"role": U, "content": "b"}]}, "Message 1 is from user but should be from assistant"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": A, "content": "a"}]}, "System message must be followed by a user message"),
    ({"messages": [{"role": "system", "content": "s"}]}, "System message must be followed by a user message"),
    ({"messages": [{"role": U, "content": "a"}, {"role": "system", "content": "s"}]}, "only the first message"),
    ({"messages": [{"role": "system", "content": ["s"]}, {"role": U, "content": "a"}]}, "Unknown content type for the system message"),
    ({"messages": [{"role": U, "content": ["a"]}]}, "Unknown content type for user message 0"),
    ({"messages": [{"role": U, "content": "a"}, {"role": A, "content": 7}]}, "Unknown content type for assistant message 1"),
    ({"messages": [{"role": U, "content": "a"}, {"role": A, "content": [{"type": "image", "text": "x"}]}]}, "Unknown part type: 'image'"),
    ({"messages": [{"role": U, "content": "a"}, {"role": A, "content": [{"type": "text"}]}]}, "part 0 must be a dict with a str 'text'"),
    ({"messages": [{"role": U, "content": "a"}, {"role": A, "content": ["plain"]}]}, "part 0 must be a dict"),
])
def test_malformed_conversations_raise_value_error_naming_the_problem(byte_tokenizer, conversation, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        byte_tokenizer.render_conversation(conversation)


def test_render_for_completion(tok):
    conversation = {"messages": [{"role": "user", "content": "What is 2+2?"},
                                 {"role": "assistant", "content": "zqxjkv four"}]}
    ids = tok.render_for_completion(conversation)
    assert ids[-1] == sid(tok, "<|assistant_start|>")
    assert ids[-2] == sid(tok, "<|user_end|>")
    prompt_ids, _ = tok.render_conversation({"messages": conversation["messages"][:1]})
    assert ids == prompt_ids + [sid(tok, "<|assistant_start|>")]
    reply = tok.encode("zqxjkv four")
    assert not any(ids[i:i + len(reply)] == reply for i in range(len(ids)))
    assert len(conversation["messages"]) == 2  # caller's conversation untouched
    with pytest.raises(ValueError, match="Last message must be from the assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


def test_visualize_tokenization_colors_by_mask(byte_tokenizer):
    ids, mask = byte_tokenizer.render_conversation({"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]})
    out = byte_tokenizer.visualize_tokenization(ids, mask)
    assert out.startswith("\033[91m<|bos|>\033[0m|\033[91m<|user_start|>\033[0m|")
    assert "\033[92mb\033[0m" in out and "\033[91ma\033[0m" in out
    assert "\033[92m<|assistant_end|>\033[0m" in out
    with_ids = byte_tokenizer.visualize_tokenization(ids, mask, with_token_id=True)
    assert "\033[92mb\033[0m\033[90m(98)\033[0m" in with_ids
    with pytest.raises(ValueError, match="differ in length"):
        byte_tokenizer.visualize_tokenization(ids, mask[:-1])


# -----------------------------------------------------------------------------
# training text, tok_eval helpers, reference encodings


def test_capped_texts_crops_documents_and_includes_the_crossing_one():
    batches = [["aaaaa", "bbbbbbbbbb"], ["cc", "dddd"], ["never"]]
    seen = []

    class Bar:
        def update(self, n):
            seen.append(n)

    texts = CappedTexts(iter(batches), max_chars=10, doc_cap=6, progress=Bar())
    assert list(texts) == ["aaaaa", "bbbbbb"]
    assert (texts.chars, texts.docs, seen) == (11, 2, [5, 6])
    everything = CappedTexts(iter(batches), max_chars=1000, doc_cap=100)
    assert list(everything) == ["aaaaa", "bbbbbbbbbb", "cc", "dddd", "never"]
    with pytest.raises(ValueError, match="positive"):
        CappedTexts([], max_chars=0, doc_cap=5)


def test_tok_eval_samples_roundtrip_and_measure(tok):
    samples = dict(load_tok_eval_samples())
    assert list(samples) == ["news", "korean", "code", "math", "science"]
    for name, text in samples.items():
        assert 300 <= len(text) <= 2000, name
        n_bytes, n_tokens, ratio = measure_compression(tok, text)
        assert n_bytes == len(text.encode("utf-8")) and n_tokens == len(tok.encode(text))
        assert ratio == pytest.approx(n_bytes / n_tokens)
    assert any(ord(c) > 0xAC00 for c in samples["korean"])


def _cache(tmp_path, monkeypatch):
    cache = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def _no_network(monkeypatch):
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("the network must not be touched")
    monkeypatch.setattr(requests, "get", refuse)


def test_reference_encoding_offline_without_cache_is_unavailable(tmp_path, monkeypatch):
    _cache(tmp_path, monkeypatch)
    _no_network(monkeypatch)
    with pytest.raises(EncodingUnavailableError, match="not in tiktoken's cache"):
        load_tiktoken_encoding("gpt2", offline=True)


def test_reference_encoding_uses_the_cache_without_network(tmp_path, monkeypatch):
    cache = _cache(tmp_path, monkeypatch)
    cache.mkdir()
    for url in tokenizer_module.TIKTOKEN_FILES["cl100k_base"]:
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"cached")
    _no_network(monkeypatch)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: f"encoding {name}")
    assert load_tiktoken_encoding("cl100k_base", offline=True) == "encoding cl100k_base"


def test_reference_encoding_download_has_a_timeout_and_failures_are_explained(tmp_path, monkeypatch):
    import requests

    cache = _cache(tmp_path, monkeypatch)
    calls = []

    class Response:
        content = b"vocab"

        def raise_for_status(self):
            pass

    def fake_get(url, timeout=None):
        calls.append((url, timeout))
        return Response()

    monkeypatch.setattr(requests, "get", fake_get)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: f"encoding {name}")
    assert load_tiktoken_encoding("gpt2", timeout=3.0) == "encoding gpt2"
    assert [t for _, t in calls] == [3.0, 3.0]
    assert sorted(os.listdir(cache)) == sorted(hashlib.sha1(u.encode()).hexdigest() for u, _ in calls)

    def unreachable(url, timeout=None):
        raise requests.ConnectionError("no route to host")

    monkeypatch.setattr(requests, "get", unreachable)
    with pytest.raises(EncodingUnavailableError, match="cl100k_base.tiktoken failed: ConnectionError"):
        load_tiktoken_encoding("cl100k_base", timeout=3.0)
