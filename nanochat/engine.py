"""
Inference engine: KV-cached sampling from a GPT, many samples per prompt, and the calculator tool.

    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, top_k=50):
        ...  # one token per sample per step; mask 0 = written by the calculator tool, not sampled
    rows, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

The engine only sees token ids; the tokenizer is needed for the special tokens (stop, tool calls)
and to turn a tool call into text and its result back into tokens.

Self-check of the cached path against a cache-free recompute of the whole sequence every step:

    python -m nanochat.engine -i base            # greedy 64 tokens both ways; prints times and whether they match
"""

import argparse
import ast
import collections
import logging
import threading
import time

import torch
import torch.nn.functional as F

from nanochat.common import get_compute_dtype

logger = logging.getLogger("nanochat")

CALCULATOR_TIMEOUT = 3.0  # seconds; upstream's SIGALRM budget
CALCULATOR_MAX_CHARS = 1000  # longer than any GSM8K/SpellingBee call; bounds the cost of big-int arithmetic
_ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
_STRING_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_FORBIDDEN_WORDS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
                    "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer for a batch of rows, in Flash-Attention-3 layout (B, T, H, D).

    k_cache, v_cache: (n_layers, B, T_max, n_kv_heads, head_dim). cache_seqlens: (B,) int32, the
    number of positions filled (here all rows move together; nanochat.batching.BatchCache is the cache
    whose rows don't). prev_embedding: (B, 1, n_embd) or None, the last token's normalised embedding,
    which the model's "smear" mixes into the next token.
    The model writes layer i through get_layer_cache(i) and calls advance(T) after its last layer.
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=None):
        if min(batch_size, num_heads, seq_len, head_dim, num_layers) < 1:
            raise ValueError(f"KVCache sizes must all be >= 1, got batch_size={batch_size}, num_heads={num_heads}, "
                             f"seq_len={seq_len}, head_dim={head_dim}, num_layers={num_layers}")
        dtype = get_compute_dtype()[0] if dtype is None else dtype
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding = None
        self.batch_size, self.max_seq_len, self.n_layers = batch_size, seq_len, num_layers
        self.n_heads, self.head_dim = num_heads, head_dim
        # A host-side copy of the position: reading cache_seqlens[0] would sync with the GPU every step.
        self._pos = 0

    def reset(self):
        """Forget everything: position 0, no previous embedding (the stored values are simply overwritten later)."""
        self.cache_seqlens.zero_()
        self._pos = 0
        self.prev_embedding = None

    def get_pos(self):
        """Number of positions already in the cache, the same for every row (a cache whose rows differ
        returns None, and the model reads each row's from cache_seqlens)."""
        return self._pos

    def get_layer_cache(self, layer_idx):
        """(k, v) views of one layer, each (B, T_max, H, D); writing into them writes the cache."""
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        """Move every row forward by `num_tokens` positions (the model calls this after its last layer)."""
        if self._pos + num_tokens > self.max_seq_len:
            raise RuntimeError(f"KV cache overflow: {self._pos} + {num_tokens} positions > capacity {self.max_seq_len}")
        self.cache_seqlens += num_tokens
        self._pos += num_tokens

    def prefill(self, other):
        """Start from `other` (a filled cache, batch 1 or this batch size): copy its positions into every row."""
        if self._pos != 0:
            raise RuntimeError(f"prefill needs an empty cache; this one already holds {self._pos} positions")
        geometry = (self.n_layers, self.n_heads, self.head_dim)
        other_geometry = (other.n_layers, other.n_heads, other.head_dim)
        if geometry != other_geometry:
            raise ValueError(f"cannot prefill a cache of (layers, heads, head_dim) = {geometry} from one of {other_geometry}")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"cannot prefill a batch-{self.batch_size} cache from a batch-{other.batch_size} one")
        n = other.get_pos()
        if n > self.max_seq_len:
            raise ValueError(f"the source cache holds {n} positions, more than this cache's capacity {self.max_seq_len}")
        self.k_cache[:, :, :n].copy_(other.k_cache[:, :, :n])  # (L, 1|B, n, H, D) broadcast over the rows
        self.v_cache[:, :, :n].copy_(other.v_cache[:, :, :n])
        self.cache_seqlens.fill_(n)
        self._pos = n
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()

    def keep_rows(self, rows):
        """Keep only the batch rows listed in `rows` (in that order); used to drop finished samples.

        Only the filled positions are copied: a cache sized for the whole context but holding a short
        prompt would otherwise copy mostly zeros every time a row finishes.
        """
        index = torch.as_tensor(rows, dtype=torch.long, device=self.k_cache.device)
        self.k_cache = _gather_rows(self.k_cache, index, self._pos)
        self.v_cache = _gather_rows(self.v_cache, index, self._pos)
        self.cache_seqlens = self.cache_seqlens.index_select(0, index)
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding.index_select(0, index)
        self.batch_size = len(rows)


def _gather_rows(cache, index, filled):
    """cache (L, B, T_max, H, D) -> (L, len(index), T_max, H, D) holding rows `index`; positions past
    `filled` are left uninitialised (nothing reads them before the model writes them)."""
    out = cache.new_empty((cache.size(0), index.numel(), *cache.shape[2:]))
    out[:, :, :filled] = cache[:, index, :filled]
    return out


# -----------------------------------------------------------------------------
# Sampling

# torch.argmax on CPU is a scalar loop (about 2 ns per element here: 0.5 ms for 8 rows of a 32,768-token
# vocabulary, 2 ms for 32), while amax is vectorised. Rows at least this long are reduced in chunks:
# 5x faster at 8 x 32,768 on a 2-core EPYC, the same index.
_ARGMAX_CHUNK = 256


def argmax_rows(logits):
    """torch.argmax(logits, dim=-1, keepdim=True) for (B, V) logits: the FIRST maximal index of each row.

    On CPU, when V is a multiple of _ARGMAX_CHUNK (and at least two chunks), it takes the first chunk
    whose max is the row's max, then the first maximal index inside it: the same index (NaN counts as
    the maximum in both), several times faster. Elsewhere it is torch.argmax itself.
    """
    B, V = logits.shape
    if logits.device.type != "cpu" or V % _ARGMAX_CHUNK or V < 2 * _ARGMAX_CHUNK:
        return torch.argmax(logits, dim=-1, keepdim=True)
    chunks = logits.reshape(B, V // _ARGMAX_CHUNK, _ARGMAX_CHUNK)
    best = chunks.amax(dim=-1).argmax(dim=-1, keepdim=True)  # (B, 1): earlier chunks all hold smaller values
    inside = chunks.gather(1, best.unsqueeze(-1).expand(B, 1, _ARGMAX_CHUNK)).squeeze(1)  # (B, chunk)
    return best * _ARGMAX_CHUNK + inside.argmax(dim=-1, keepdim=True)


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """One token per row from logits (B, V) -> (B, 1) int64.

    temperature 0 is greedy (top_k ignored, no softmax); top_k None or <= 0 samples from the full softmax.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return argmax_rows(logits)
    if top_k is not None and top_k > 0:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (B, k) each
        probs = F.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)  # (B, 1) index into the top k
        return indices.gather(-1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


# -----------------------------------------------------------------------------
# Calculator tool


class _CalculatorRejected(ValueError):
    """The expression uses something outside the calculator's small language."""


_BINARY_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}
_UNARY_OPS = {ast.USub: lambda a: -a, ast.UAdd: lambda a: +a}


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _evaluate_node(node):
    """Evaluate a whitelisted AST: number/str literals, + - * / //, unary +-, and str.count(...)."""
    if isinstance(node, ast.Expression):
        return _evaluate_node(node.body)
    if isinstance(node, ast.Constant) and (_is_number(node.value) or isinstance(node.value, str)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate_node(node.left), _evaluate_node(node.right)
        if not (_is_number(left) and _is_number(right)):
            raise _CalculatorRejected("arithmetic works on numbers only")
        return _BINARY_OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _evaluate_node(node.operand)
        if not _is_number(operand):
            raise _CalculatorRejected("unary +/- works on numbers only")
        return _UNARY_OPS[type(node.op)](operand)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and not node.keywords and len(node.args) == 1):
        # Only one argument can reach here anyway: commas were stripped before parsing.
        receiver, needle = _evaluate_node(node.func.value), _evaluate_node(node.args[0])
        if not (isinstance(receiver, str) and isinstance(needle, str)):
            raise _CalculatorRejected(".count works on a string with a string argument")
        return receiver.count(needle)
    raise _CalculatorRejected(f"{type(node).__name__} is not allowed in a calculator expression")


def _calculator_allows(expr):
    """The character and keyword screen: arithmetic without '**', or a string .count() call."""
    if len(expr) > CALCULATOR_MAX_CHARS:
        return False
    if all(c in _ARITHMETIC_CHARS for c in expr):
        return "**" not in expr  # powers can take forever and allocate gigabytes: 9**9**9
    if not all(c in _STRING_CHARS for c in expr):
        return False
    lowered = expr.lower()
    if any(word in lowered for word in _FORBIDDEN_WORDS):
        return False
    return ".count(" in expr


def _evaluate_expression(expr):
    """Parse and evaluate; None for anything that fails (syntax, division by zero, rejected node...)."""
    try:
        value = _evaluate_node(ast.parse(expr.strip(), mode="eval"))
        str(value)  # raises ValueError for ints past Python's digit limit; the engine needs the text
        return value
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, MemoryError, RecursionError):
        return None


def use_calculator(expr, timeout=CALCULATOR_TIMEOUT):
    """The model's calculator tool: the value of `expr`, or None when it is not allowed or fails.

    Accepts arithmetic on numbers (+ - * / //, parentheses; commas in numbers are ignored) and
    `'word'.count('letter')`. Nothing is ever passed to eval(): the expression is parsed and walked
    over a whitelist of AST nodes. `timeout` (seconds, may be fractional) bounds the wall time from
    any thread, not just the main one (upstream used SIGALRM, which only works there).
    """
    if not isinstance(expr, str):
        raise TypeError(f"the calculator takes a str, got {type(expr).__name__}")
    expr = expr.replace(",", "")
    if not _calculator_allows(expr):
        return None
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_evaluate_expression(expr)), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        logger.warning("calculator gave up on %r after %.1f s", expr[:80], timeout)
        return None
    return outcome[0]


# -----------------------------------------------------------------------------
# Engine


class RowState:
    """Per-sample bookkeeping during generation: pending forced tokens and the tool-call parser."""

    def __init__(self):
        self.forced = collections.deque()  # tokens the tool writes, emitted one per step
        self.in_python = False
        self.expression = []  # token ids between <|python_start|> and <|python_end|>
        self.terminal = None  # the token that ended this row (assistant_end or bos), once it has


def model_device(model):
    """The device a model computes on: get_device() when it has one (GPT), else its first parameter or buffer."""
    if hasattr(model, "get_device"):
        return model.get_device()
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def last_logits(model, ids, kv_cache):
    """Logits (B, V) of the last position of ids (B, T), advancing kv_cache by T.

    A model with hidden_states/logits (GPT) runs its head on the last position only: over a whole
    prompt the head would cost a (T, n_embd) x (n_embd, V) matmul and a (T, V) fp32 tensor for
    nothing. Other models (the tests' mocks) go through forward.
    """
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        return model.logits(model.hidden_states(ids, kv_cache)[:, -1])
    return model.forward(ids, kv_cache=kv_cache)[:, -1, :]


class Engine:
    """Batched, KV-cached generation with the calculator tool, for a GPT and its tokenizer.

    `tokenizer` may be None for pure token streams (no stop tokens, no tools). `kv_dtype` defaults to
    the dtype the model computes keys and values in (model.compute_dtype, else the global one).
    """

    def __init__(self, model, tokenizer=None, kv_dtype=None):
        self.model = model
        self.tokenizer = tokenizer
        self.kv_dtype = kv_dtype if kv_dtype is not None else getattr(model, "compute_dtype", None)
        self.special = None
        if tokenizer is not None:
            names = ("python_start", "python_end", "output_start", "output_end", "assistant_end")
            self.special = {name: tokenizer.encode_special(f"<|{name}|>") for name in names}
            self.special["bos"] = tokenizer.get_bos_token_id()

    def new_cache(self, batch_size, seq_len, device):
        """An empty KVCache for this model: `batch_size` rows of `seq_len` positions, in the engine's KV dtype."""
        cfg = self.model.config
        return KVCache(batch_size=batch_size, num_heads=cfg.n_kv_head, seq_len=seq_len, head_dim=cfg.n_embd // cfg.n_head,
                       num_layers=cfg.n_layer, device=device, dtype=self.kv_dtype)

    def _budget(self, prompt_len, max_tokens):
        """How many tokens may be generated: max_tokens, or (None) up to the model's context length."""
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or max_tokens < 0:
                raise ValueError(f"max_tokens must be None or an int >= 0, got {max_tokens!r}")
            return max_tokens
        # Upstream sized the cache to sequence_len whatever the prompt, so a long prompt overflowed it.
        room = self.model.config.sequence_len - prompt_len
        if room <= 0:
            raise ValueError(f"the prompt ({prompt_len} tokens) already fills the model's context "
                             f"({self.model.config.sequence_len}); shorten it or pass max_tokens explicitly")
        return room

    def _step_row(self, state, token):
        """Run the stop check and the tool-call state machine for one row after it emits `token`."""
        if token == self.special["assistant_end"] or token == self.special["bos"]:
            state.terminal = token
        else:
            self.track_tool_call(state, token)

    def track_tool_call(self, state, token):
        """The calculator tool for one row that emitted `token` (not a stop token): collect the expression
        between <|python_start|> and <|python_end|>, then queue its result as forced tokens."""
        sp = self.special
        if token == sp["python_start"]:
            state.in_python, state.expression = True, []
        elif token == sp["python_end"] and state.in_python:
            state.in_python = False
            if state.expression:
                result = use_calculator(self.tokenizer.decode(state.expression))
                if result is not None:
                    state.forced.extend([sp["output_start"], *self.tokenizer.encode(str(result)), sp["output_end"]])
            state.expression = []
        elif state.in_python:
            state.expression.append(token)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Stream (token_column, token_masks) per step: lists of length num_samples.

        mask 1 = sampled, 0 = forced by the calculator tool. Each sample draws its own first token. A
        row ends at <|assistant_end|> or <|bos|>; afterwards it repeats that token with mask 0 while
        the others go on, and stops costing compute (it is dropped from the batch). At most
        max_tokens steps (None: until the model's context is full).
        """
        if not isinstance(tokens, list) or not tokens or not all(_is_number(t) and isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of int token ids")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        budget = self._budget(len(tokens), max_tokens)
        device = model_device(self.model)
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # Prefill once at batch 1, then copy the cache into num_samples rows for decoding.
        prefill_cache = self.new_cache(1, len(tokens), device)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        logits = last_logits(self.model, ids, prefill_cache)  # (1, V)
        # Expanding the logits (not a sampled token) lets every sample draw its own first token.
        logits = logits.expand(num_samples, -1)  # (B, V)
        cache = self.new_cache(num_samples, len(tokens) + budget, device)
        cache.prefill(prefill_cache)
        del prefill_cache

        states = [RowState() for _ in range(num_samples)]
        active = list(range(num_samples))  # sample index of each row still in the batch
        for step in range(budget):
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()  # one per active row
            column = [state.terminal for state in states]
            masks = [0] * num_samples
            for row, sample in enumerate(active):
                state = states[sample]
                if state.forced:
                    column[sample] = state.forced.popleft()
                else:
                    column[sample], masks[sample] = sampled[row], 1
                if self.special is not None:
                    self._step_row(state, column[sample])
            yield column, masks

            still = [row for row, sample in enumerate(active) if states[sample].terminal is None]
            if not still or step == budget - 1:
                break  # no forward pass whose logits nobody would use
            if len(still) < len(active):
                cache.keep_rows(still)
                active = [active[row] for row in still]
            step_ids = torch.tensor([column[sample] for sample in active], dtype=torch.long, device=device)
            logits = last_logits(self.model, step_ids.view(-1, 1), cache)  # (B, 1) in, (B, V) out

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run generate to the end. Returns (results, masks): per sample, prompt + generated tokens, and a
        mask that is 0 over the prompt, then 1 for sampled / 0 for forced tokens. The terminal token
        (<|assistant_end|>/<|bos|>) is not included."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        terminals = set() if self.special is None else {self.special["assistant_end"], self.special["bos"]}
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in terminals:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks


# -----------------------------------------------------------------------------
# Reference (cache-free) generation and the self-check


# The fixed prompts whose greedy completions base_train, base_eval and base_loss print as a smell test.
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def complete_prompts(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """Greedy completions (decoded, BOS included) of each prompt, one batch-1 generation per prompt."""
    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    texts = []
    for prompt in prompts:
        rows, _ = engine.generate_batch(tokenizer.encode(prompt, prepend=bos), num_samples=1, max_tokens=max_tokens, temperature=0)
        texts.append(tokenizer.decode(rows[0]))
    return texts


def unconditioned_samples(model, tokenizer, num_samples=8, max_tokens=128, temperature=1.0):
    """Samples from BOS alone: what the model writes when nobody asks it anything."""
    bos = tokenizer.get_bos_token_id()
    rows, _ = Engine(model, tokenizer).generate_batch([bos], num_samples=num_samples, max_tokens=max_tokens, temperature=temperature)
    return [tokenizer.decode(row) for row in rows]


def compare_with_reference(model, prompt_tokens, max_tokens=64):
    """Greedy-generate with the model's cache-free sampler (GPT.generate) and with the Engine; time both.

    Returns {"reference": ids, "engine": ids, "reference_seconds", "engine_seconds", "match": bool}.
    """
    def timed(fn):
        if model_device(model).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if model_device(model).type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    reference, ref_s = timed(lambda: list(model.generate(prompt_tokens, max_tokens, temperature=0)))
    # The naive sampler knows no stop tokens or tools, so compare raw streams: an Engine without tokenizer.
    engine = Engine(model, None)
    (rows, _), eng_s = timed(lambda: engine.generate_batch(prompt_tokens, max_tokens=max_tokens, temperature=0))
    generated = rows[0][len(prompt_tokens):]
    return {"reference": reference, "engine": generated, "reference_seconds": ref_s, "engine_seconds": eng_s,
            "match": reference == generated}


def build_parser():
    p = argparse.ArgumentParser(description="Check KV-cached generation against cache-free recomputation (greedy).")
    p.add_argument("-i", "--source", default="base", choices=("base", "mid", "sft", "rl"), help="checkpoint family to load")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint directory tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("-p", "--prompt", default="The chemical formula of water is", help="text to continue")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens to generate with each path")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    return p


def main(argv=None):
    from nanochat.checkpoint_manager import load_model
    from nanochat.common import autodetect_device_type, compute_init, setup_default_logging

    setup_default_logging()
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise SystemExit(f"--max-tokens must be >= 1, got {args.max_tokens}")
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    prompt = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())
    result = compare_with_reference(model, prompt, args.max_tokens)
    logger.info("reference: %.3f s | %s", result["reference_seconds"], tokenizer.decode(result["reference"]))
    logger.info("engine:    %.3f s | %s", result["engine_seconds"], tokenizer.decode(result["engine"]))
    logger.info("match: %s", result["match"])
    return 0 if result["match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
