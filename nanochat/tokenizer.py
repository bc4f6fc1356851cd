"""
The BPE tokenizer, trained with our Rust crate `rustbpe` and run with tiktoken, plus the chat format.
`python -m scripts.tok_train` writes <base>/tokenizer/tokenizer.pkl (a pickled tiktoken Encoding) and
token_bytes.pt (bits per byte needs it). Tests: tests/test_tokenizer.py.

    tok = get_tokenizer()
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]})
"""

import collections
import hashlib
import logging
import os
import pathlib
import pickle
import re
import tempfile

import tiktoken

from nanochat.common import UserError, atomic_write, get_base_dir

log = logging.getLogger(__name__)

# GPT-4's split pattern with one change: numbers split into groups of at most 2 digits (GPT-4 uses 3).
# At d12 / 32K vocab, val bpb was 0.969 for {1,1}, 0.965 for {1,2}, 0.972 for {1,3}.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# Order matters: special token i gets id len(mergeable_ranks) + i.
SPECIAL_TOKENS = [
    "<|bos|>",            # starts every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",  # generation stops here
    "<|python_start|>",   # the assistant calls the calculator tool ...
    "<|python_end|>",
    "<|output_start|>",   # ... and the engine (not the model) writes its output between these
    "<|output_end|>",
]

NUM_BYTE_TOKENS = 256
TRAIN_HINT = "train one with `python -m scripts.tok_train` (after `python -m nanochat.dataset -n 8`)"


class TokenizerNotFoundError(UserError, FileNotFoundError):
    """The tokenizer files under <base>/tokenizer are missing."""


class EncodingUnavailableError(UserError, RuntimeError):
    """A tiktoken reference encoding (GPT-2, GPT-4) could not be loaded."""


class RustBPETokenizer:
    """A tiktoken Encoding with nanochat's special tokens and chat rendering on top."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self._special_ids = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def from_mergeable_ranks(cls, mergeable_ranks, pattern=SPLIT_PATTERN):
        """A tokenizer from `{token_bytes: rank}` (ranks 0..N-1) with the 9 special tokens after them."""
        ranks = dict(mergeable_ranks)
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("mergeable ranks must be exactly 0..N-1 (one rank per token, no gaps)")
        special_tokens = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, buffer_size=8192):
        """Train BPE merges with rustbpe on an iterable of str; `vocab_size` includes the 9 special tokens.
        A corpus that runs out of pairs gives a smaller vocabulary, with a warning."""
        vocab_size_no_special = vocab_size - len(SPECIAL_TOKENS)
        if vocab_size_no_special < NUM_BYTE_TOKENS:
            raise ValueError(f"vocab_size must be at least {NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)} "
                             f"({NUM_BYTE_TOKENS} byte tokens + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        try:
            import rustbpe
        except ImportError as e:
            raise ImportError("the `rustbpe` extension is not installed; build it with `uv sync` (needs a Rust "
                              "toolchain: https://rustup.rs)") from e
        # An unbuilt rustbpe/ source directory next to the repo imports as an empty namespace package.
        if not hasattr(rustbpe, "Tokenizer"):
            raise ImportError(f"`rustbpe` resolves to {list(getattr(rustbpe, '__path__', []))}, which has no compiled "
                              "Tokenizer; build the extension with `uv sync` (needs a Rust toolchain: https://rustup.rs)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, vocab_size_no_special, buffer_size=buffer_size, pattern=SPLIT_PATTERN)
        # bytes(k): older PyO3 builds handed the token bytes back as a list of ints.
        pairs = [(bytes(k), v) for k, v in trainer.get_mergeable_ranks()]
        ranks = dict(pairs)
        if len(ranks) != len(pairs):
            dupes = [k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1]
            raise RuntimeError(f"rustbpe produced {len(pairs) - len(ranks)} duplicate token byte strings "
                               f"(e.g. {dupes[:3]}); tiktoken needs each token's bytes to be unique")
        if len(ranks) < vocab_size_no_special:
            log.warning("The corpus ran out of pairs after %d merges: the vocabulary has %d tokens instead of %d. "
                        "Train on more (or more varied) text to get the full size.",
                        len(ranks) - NUM_BYTE_TOKENS, len(ranks) + len(SPECIAL_TOKENS), vocab_size)
        return cls.from_mergeable_ranks(ranks, trainer.get_pattern())

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load the tokenizer saved by `save` (tokenizer.pkl, a pickled tiktoken Encoding)."""
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path):
            raise TokenizerNotFoundError(f"No tokenizer at {path}; {TRAIN_HINT}")
        with open(path, "rb") as f:
            enc = pickle.load(f)  # our own file, written by save()
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name, offline=False, timeout=10.0):
        """A tiktoken reference encoding ("gpt2", "cl100k_base"), <|endoftext|> as BOS; never hangs (EncodingUnavailableError)."""
        return cls(load_tiktoken_encoding(tiktoken_name, offline=offline, timeout=timeout), "<|endoftext|>")

    def save(self, tokenizer_dir):
        """Pickle the Encoding to <tokenizer_dir>/tokenizer.pkl (atomically); returns the path."""
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        atomic_write(path, pickle.dumps(self.enc))
        log.info("Saved tokenizer encoding to %s", path)
        return path

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return set(self._special_ids)

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def encode_special(self, text):
        """The id of a special token given by its exact name, e.g. "<|bos|>"."""
        try:
            return self._special_ids[text]
        except KeyError:
            raise ValueError(f"{text!r} is not a special token of this tokenizer (known: {sorted(self._special_ids)})") from None

    def get_bos_token_id(self):
        return self.bos_token_id

    def decode_single_token_bytes(self, token_id):
        """The raw bytes of one token; may be an incomplete UTF-8 sequence."""
        return self.enc.decode_single_token_bytes(token_id)

    def _special_or_id(self, token, what):
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < self.get_vocab_size():
                raise ValueError(f"{what} id {token} is outside the vocabulary (0..{self.get_vocab_size() - 1})")
            return token
        raise ValueError(f"{what} must be a special-token string or an int id, got {type(token).__name__}")

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Ids of a str, or a list of id lists for a list of str (in `num_threads` threads). Special-token names
        in the text stay plain text; `prepend`/`append` (a special-token name or an id) go around every row."""
        pre = None if prepend is None else self._special_or_id(prepend, "prepend")
        post = None if append is None else self._special_or_id(append, "append")
        if isinstance(text, str):
            rows, single = [self.enc.encode_ordinary(text)], True
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            rows, single = self.enc.encode_ordinary_batch(text, num_threads=num_threads), False
        else:
            raise ValueError(f"Invalid input type: {type(text).__name__}; encode takes a str or a list of str")
        for row in rows:
            if pre is not None:
                row.insert(0, pre)
            if post is not None:
                row.append(post)
        return rows[0] if single else rows

    __call__ = encode

    def decode(self, ids):
        """Text of a list of ids; special ids come out as their names, broken UTF-8 as U+FFFD."""
        return self.enc.decode(list(ids))

    def render_conversation(self, conversation, max_tokens=2048):
        """(ids, mask) of a conversation for training, both at most max_tokens long. mask[i] = 1 where the
        assistant produces ids[i] (its text, tool calls, <|assistant_end|>); a system message is folded in."""
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        ids, mask = [self.encode_special("<|bos|>")], [0]
        for role, content in _checked_messages(conversation):
            turn_ids, turn_mask = self.render_message(role, content)
            ids.extend(turn_ids)
            mask.extend(turn_mask)
        return ids[:max_tokens], mask[:max_tokens]

    def render_message(self, role, content, tool_names=False):
        """(ids, mask) of one user or assistant turn; content is a str, or for the assistant a list of
        (part_type, text). tool_names: tool-token names written in an assistant's str content become the special
        tokens again (a reply a client sends back as Reply(tools="raw") showed it); never for user text."""
        ids, mask = [], []

        def add(tokens, value):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([value] * len(tokens))

        special = self.encode_special
        if role == "user":
            add(special("<|user_start|>"), 0)
            add(self.encode(content), 0)
            add(special("<|user_end|>"), 0)
            return ids, mask
        if isinstance(content, str):
            content = _tool_parts(content) if tool_names else [("text", content)]
        add(special("<|assistant_start|>"), 0)
        # Parts are encoded one by one, so no BPE merge crosses a part boundary: the model
        # sees the same tokens at training time as the engine produces at inference time.
        for part_type, text in content:
            if part_type == "text":
                add(self.encode(text), 1)
            elif part_type == "python":
                add(special("<|python_start|>"), 1)
                add(self.encode(text), 1)
                add(special("<|python_end|>"), 1)
            elif part_type == "python_output":  # written by the interpreter at inference, so never a target
                add(special("<|output_start|>"), 0)
                add(self.encode(text), 0)
                add(special("<|output_end|>"), 0)
            else:  # "token": a tool token without its pair, as in a reply cut off inside a calculator call
                add(special(text), 0 if text.startswith("<|output") else 1)
        add(special("<|assistant_end|>"), 1)
        return ids, mask

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the final assistant turn: drop that turn, render, add <|assistant_start|>."""
        messages = _messages_of(conversation)
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError("Last message must be from the assistant (it is the reply to be completed)")
        prompt = dict(conversation, messages=messages[:-1])
        ids, _ = self.render_conversation(prompt)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Tokens joined by '|', green where mask=1 (trained on), red where mask=0; optional gray (id)."""
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length ({len(ids)} vs {len(mask)})")
        green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
        pieces = []
        for token_id, m in zip(ids, mask):
            piece = f"{green if m == 1 else red}{self.id_to_token(token_id)}{reset}"
            if with_token_id:
                piece += f"{gray}({token_id}){reset}"
            pieces.append(piece)
        return "|".join(pieces)


def fold_system(system, user):
    """`user` with the system text and a blank line in front: the chat format has no system turn (training, serving)."""
    return system + "\n\n" + user


TOOL_TOKENS = SPECIAL_TOKENS[5:]  # the calculator's four: python_start/end, output_start/end
_TOOL_NAME = re.compile("(" + "|".join(re.escape(name) for name in TOOL_TOKENS) + ")")
_TOOL_PAIRS = {"<|python_start|>": ("<|python_end|>", "python"), "<|output_start|>": ("<|output_end|>", "python_output")}


def _tool_parts(text):
    # "a<|python_start|>1+1<|python_end|>" -> [("text", "a"), ("python", "1+1")]; an unpaired name stays a "token".
    pieces = [piece for piece in _TOOL_NAME.split(text) if piece]
    parts, i = [], 0
    while i < len(pieces):
        piece = pieces[i]
        if piece in _TOOL_PAIRS:
            end, kind = _TOOL_PAIRS[piece]
            body = pieces[i + 1] if i + 1 < len(pieces) and pieces[i + 1] not in TOOL_TOKENS else ""
            close = i + 1 + (body != "")
            if close < len(pieces) and pieces[close] == end:
                parts.append((kind, body))
                i = close + 1
                continue
        parts.append(("token" if piece in TOOL_TOKENS else "text", piece))
        i += 1
    return parts


def _messages_of(conversation):
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError(f"a conversation is a dict with a 'messages' list, got {type(conversation).__name__}"
                         + (f" with keys {sorted(conversation)}" if isinstance(conversation, dict) else ""))
    return conversation["messages"]


def _checked_messages(conversation):
    """Validate a conversation and yield (role, content), the system message folded in, the input unmodified."""
    messages = _messages_of(conversation)
    if not messages:
        raise ValueError("conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"Message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"Message {i} has unknown role {message['role']!r} (expected system, user or assistant)")

    start, system = 0, None
    if messages[0]["role"] == "system":
        if not isinstance(messages[0]["content"], str):
            raise ValueError(f"Unknown content type for the system message: {type(messages[0]['content']).__name__} (expected str)")
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("System message must be followed by a user message")
        start, system = 1, messages[0]["content"]

    for i in range(start, len(messages)):
        role, content = messages[i]["role"], messages[i]["content"]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role == "system":
            raise ValueError(f"Message {i} is a system message; only the first message may be one")
        if role != expected:
            raise ValueError(f"Message {i} is from {role} but should be from {expected} (turns must alternate, starting with user)")
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(f"Unknown content type for user message {i}: {type(content).__name__} (expected str)")
            yield role, (fold_system(system, content) if i == start and system is not None else content)
        elif isinstance(content, str):
            yield role, content
        elif isinstance(content, list):
            yield role, [_checked_part(i, j, part) for j, part in enumerate(content)]
        else:
            raise ValueError(f"Unknown content type for assistant message {i}: {type(content).__name__} (expected str or list of parts)")


def _checked_part(i, j, part):
    if not isinstance(part, dict) or not isinstance(part.get("text"), str):
        raise ValueError(f"Message {i} part {j} must be a dict with a str 'text', got {part!r:.80}")
    if part.get("type") not in ("text", "python", "python_output"):
        raise ValueError(f"Unknown part type: {part.get('type')!r} (message {i} part {j}; expected text, python or python_output)")
    return part["type"], part["text"]


def compute_token_bytes(tokenizer):
    """int32 tensor [vocab]: number of raw bytes of each token, 0 for special tokens."""
    import torch

    special_ids = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    counts = []
    for token_id in range(tokenizer.get_vocab_size()):
        try:  # the token's own bytes: decoding to str would count a partial UTF-8 sequence as U+FFFD, 3 bytes
            counts.append(0 if token_id in special_ids else len(tokenizer.decode_single_token_bytes(token_id)))
        except KeyError:
            # An id no token owns (only in some tiktoken reference vocabularies): encode never emits it.
            counts.append(0)
    return torch.tensor(counts, dtype=torch.int32)


def token_bytes_summary(token_bytes):
    """min/max (ints) and mean/sample-std over the non-special entries of a token_bytes tensor."""
    import torch

    nonzero = token_bytes[token_bytes > 0].to(torch.float32)
    if nonzero.numel() == 0:
        raise ValueError("token_bytes has no non-special tokens")
    return {"token_bytes_min": int(nonzero.min().item()), "token_bytes_max": int(nonzero.max().item()),
            "token_bytes_mean": nonzero.mean().item(),
            "token_bytes_std": nonzero.std().item() if nonzero.numel() > 1 else 0.0}  # std: Bessel-corrected


def get_tokenizer():
    """The tokenizer trained by `python -m scripts.tok_train`, from <base>/tokenizer."""
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    """The int32 [vocab] tensor of token byte lengths written by tok_train, on `device`."""
    import torch

    path = os.path.join(get_base_dir(), "tokenizer", "token_bytes.pt")
    if not os.path.exists(path):
        raise TokenizerNotFoundError(f"Token bytes not found at {path}; they are written by tok_train: {TRAIN_HINT}")
    return torch.load(path, map_location=device)


class CappedTexts:
    """Documents from batches of str, each cut to `doc_cap` characters, until more than `max_chars` were
    yielded (counted in `chars` and `docs`); `progress` (e.g. a tqdm bar) gets update(n_chars)."""

    def __init__(self, doc_batches, max_chars, doc_cap, progress=None):
        if max_chars < 1 or doc_cap < 1:
            raise ValueError(f"max_chars and doc_cap must be positive, got {max_chars} and {doc_cap}")
        self.doc_batches, self.max_chars, self.doc_cap, self.progress = doc_batches, max_chars, doc_cap, progress
        self.chars = self.docs = 0

    def __iter__(self):
        for batch in self.doc_batches:
            for doc in batch:
                doc = doc[: self.doc_cap]
                self.chars += len(doc)
                self.docs += 1
                if self.progress is not None:
                    self.progress.update(len(doc))
                yield doc
                if self.chars > self.max_chars:
                    return


TOK_EVAL_SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tok_eval_samples")
TOK_EVAL_SAMPLE_NAMES = ["news", "korean", "code", "math", "science"]


def load_tok_eval_samples():
    """[(name, text)] for the short sample texts shipped in nanochat/data/tok_eval_samples/."""
    return [(name, pathlib.Path(TOK_EVAL_SAMPLES_DIR, f"{name}.txt").read_text(encoding="utf-8"))
            for name in TOK_EVAL_SAMPLE_NAMES]


def measure_compression(tokenizer, text, label="tokenizer"):
    """(bytes, tokens, bytes per token) of the ordinary encoding of `text`; checks it decodes back exactly."""
    ids = tokenizer.encode(text)
    if tokenizer.decode(ids) != text:
        raise RuntimeError(f"{label} does not reproduce the text on encode/decode ({len(text)} characters starting {text[:40]!r})")
    n_bytes = len(text.encode("utf-8"))
    return n_bytes, len(ids), n_bytes / max(len(ids), 1)


# The files tiktoken fetches for each encoding (tiktoken_ext/openai_public.py); cached by tiktoken
# under sha1(url) in its cache directory.
_BLOB = "https://openaipublic.blob.core.windows.net"
TIKTOKEN_FILES = {
    "gpt2": [f"{_BLOB}/gpt-2/encodings/main/vocab.bpe", f"{_BLOB}/gpt-2/encodings/main/encoder.json"],
    "r50k_base": [f"{_BLOB}/encodings/r50k_base.tiktoken"],
    "p50k_base": [f"{_BLOB}/encodings/p50k_base.tiktoken"],
    "cl100k_base": [f"{_BLOB}/encodings/cl100k_base.tiktoken"],
    "o200k_base": [f"{_BLOB}/encodings/o200k_base.tiktoken"],
}


def load_tiktoken_encoding(name, offline=False, timeout=10.0):
    """tiktoken.get_encoding(name) that never blocks on the network; raises EncodingUnavailableError saying why."""
    urls = TIKTOKEN_FILES.get(name)
    # tiktoken.load's rule for its cache; "" = caching disabled
    cache_dir = next((os.environ[var] for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR") if var in os.environ),
                     os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    if urls is None or cache_dir == "":
        if offline:
            why = "tiktoken caching is disabled (TIKTOKEN_CACHE_DIR is empty)" if urls is not None else f"no known cache files for {name!r}"
            raise EncodingUnavailableError(f"{why}; not trying the network (offline)")
        return _get_encoding(name)
    missing = [u for u in urls if not os.path.exists(os.path.join(cache_dir, hashlib.sha1(u.encode()).hexdigest()))]
    if missing and offline:
        raise EncodingUnavailableError(f"not in tiktoken's cache {cache_dir} and offline; run once with network access "
                                       "or point TIKTOKEN_CACHE_DIR at a cache that has it")
    if missing:  # downloaded here, into tiktoken's cache, because tiktoken's own download has no timeout
        import requests

        for url in missing:
            try:
                response = requests.get(url, timeout=timeout)
                response.raise_for_status()
            except requests.RequestException as e:
                # requests' messages run to several lines of urllib3 detail; the exception type says enough.
                reason = "timed out" if isinstance(e, requests.Timeout) else type(e).__name__
                raise EncodingUnavailableError(f"download of {url} failed: {reason}; tiktoken's cache is {cache_dir}") from e
            atomic_write(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()), response.content)
    return _get_encoding(name)


def _get_encoding(name):
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; a bad cached file is a ValueError
        raise EncodingUnavailableError(f"tiktoken could not load {name!r}: {type(e).__name__}: {e}") from e
