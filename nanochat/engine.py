"""
Inference: KV-cached sampling from a GPT, many samples per prompt, and the calculator tool.

    for column, masks in Engine(model, tokenizer).generate(prompt_ids, num_samples=4, max_tokens=64):
        ...  # one token per sample per step; mask 0 = written by the calculator tool, not sampled

DecodeBatch is the one decode loop: Engine.generate and nanochat.batching.BatchScheduler both run it.
"""

import ast
import collections
import itertools
import logging
import threading

import torch
import torch.nn.functional as F

from nanochat.common import get_compute_dtype

logger = logging.getLogger("nanochat")

CALCULATOR_TIMEOUT = 3.0  # seconds; far more than any screened expression needs
CALCULATOR_MAX_CHARS = 1000  # longer than any GSM8K/SpellingBee call; bounds the cost of big-int arithmetic
_ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
_STRING_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_FORBIDDEN_WORDS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
                    "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer for B rows, each at its own position: k_cache, v_cache (n_layers, B, T,
    n_kv_heads, head_dim); lengths (host) and cache_seqlens ((B,) int32) count each row's positions; prev_embedding
    (B, 1, n_embd) or None feeds the model's smear. The model writes get_layer_cache(i), then calls advance(T).
    A cache made with rows holds all seq_len positions; one that gets its rows later (add_rows) holds what they
    fill, and reserve(rows, positions) grows it."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=None):
        if batch_size < 0 or min(num_heads, seq_len, head_dim, num_layers) < 1:
            raise ValueError(f"KVCache needs batch_size >= 0 and the other sizes >= 1, got batch_size={batch_size}, "
                             f"num_heads={num_heads}, seq_len={seq_len}, head_dim={head_dim}, num_layers={num_layers}")
        self.dtype = get_compute_dtype()[0] if dtype is None else dtype
        self.device, self.max_seq_len = device, seq_len
        self.n_layers, self.n_heads, self.head_dim = num_layers, num_heads, head_dim
        self._k = self._v = self.prev_embedding = None  # storage: rows come (add_rows) and go (keep_rows) inside it
        self.reserve(batch_size, seq_len if batch_size else None)
        self._set_lengths([0] * batch_size)

    batch_size = property(lambda self: len(self.lengths))
    capacity = property(lambda self: 0 if self._k is None else self._k.size(1))
    positions = property(lambda self: 0 if self._k is None else self._k.size(2))  # stored; max_seq_len is the limit
    k_cache = property(lambda self: None if self._k is None else self._k[:, :len(self.lengths)])
    v_cache = property(lambda self: None if self._v is None else self._v[:, :len(self.lengths)])

    def get_pos(self):
        """Positions every row holds, or None while rows differ (the model then reads `lengths`)."""
        first = self.lengths[0] if self.lengths else 0
        return first if all(n == first for n in self.lengths) else None

    def get_layer_cache(self, layer_idx):
        """(k, v) views of one layer, each (B, T_max, H, D); writing into them writes the cache."""
        return self._k[layer_idx, :len(self.lengths)], self._v[layer_idx, :len(self.lengths)]

    def advance(self, num_tokens):
        """Every row moves on by `num_tokens` positions (the model calls this after its last layer)."""
        longest = max(self.lengths, default=0)
        if longest + num_tokens > self.max_seq_len:
            raise RuntimeError(f"KV cache overflow: {longest} + {num_tokens} positions > capacity {self.max_seq_len}")
        self.lengths = [n + num_tokens for n in self.lengths]
        self.cache_seqlens += num_tokens

    def reset(self):
        """Every row back to position 0 (the stored values are simply overwritten later)."""
        self._set_lengths([0] * len(self.lengths))
        self.prev_embedding = None

    def prefill(self, other):
        """Start every row of this empty cache from `other` (a filled cache of 1 row, or of as many rows)."""
        if any(self.lengths):
            raise RuntimeError(f"prefill needs an empty cache; this one already holds {max(self.lengths)} positions")
        rows, self.lengths = len(self.lengths), []  # add_rows sets both length records
        self.add_rows(other, rows)

    def add_rows(self, source, copies=1):
        """Append `copies` rows holding what `source` holds (a filled cache of 1 row, or of `copies` rows)."""
        n, geometry = source.get_pos(), (self.n_layers, self.n_heads, self.head_dim)
        if (source.n_layers, source.n_heads, source.head_dim) != geometry:
            raise ValueError(f"cannot fill a cache of (layers, heads, head_dim) = {geometry} from one of "
                             f"{(source.n_layers, source.n_heads, source.head_dim)}")
        if source.batch_size not in (1, copies):
            raise ValueError(f"cannot fill {copies} rows from a batch-{source.batch_size} cache")
        if n is None or n > self.max_seq_len:
            raise ValueError(f"the source cache holds {n} positions (None: rows differ); this cache's capacity is {self.max_seq_len}")
        first = len(self.lengths)
        if first and (source.prev_embedding is None) != (self.prev_embedding is None):
            raise ValueError("every row needs a previous embedding (the smear), or none does")
        self.reserve(first + copies, n)
        self._k[:, first:first + copies, :n] = source.k_cache[:, :, :n]  # (L, 1|copies, n, H, D) broadcast over the copies
        self._v[:, first:first + copies, :n] = source.v_cache[:, :, :n]
        if source.prev_embedding is not None:
            prev = source.prev_embedding.expand(copies, -1, -1)  # (copies, 1, d)
            self.prev_embedding = prev.clone() if self.prev_embedding is None else torch.cat([self.prev_embedding, prev])
        self._set_lengths(self.lengths + [n] * copies)

    def keep_rows(self, rows):
        """Keep only the rows listed in `rows`, in that order (finished samples leave); none left frees the storage."""
        if not rows:
            self._k = self._v = self.prev_embedding = None  # an idle batch holds no memory
            return self._set_lengths([])
        # Rows already in place stay put; only the filled positions move (a cache sized for the whole context
        # but holding short rows would otherwise copy mostly zeros).
        start, filled = next((i for i, r in enumerate(rows) if r != i), len(rows)), max(self.lengths)
        index = torch.as_tensor(rows[start:], dtype=torch.long, device=self._k.device)
        # Indexing copies the source rows first, so a row may move onto one that moves too.
        self._k[:, start:len(rows), :filled] = self._k[:, index, :filled]
        self._v[:, start:len(rows), :filled] = self._v[:, index, :filled]
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding[rows]
        self._set_lengths([self.lengths[r] for r in rows])

    def reserve(self, rows, positions=None):
        """Storage for at least `rows` rows and `positions` positions (None: those it has), keeping the live ones."""
        if positions is not None and positions > self.max_seq_len:
            raise RuntimeError(f"KV cache overflow: {positions} positions > capacity {self.max_seq_len}")
        if rows <= self.capacity and (positions or 0) <= self.positions:
            return
        if positions is None:
            positions = self.positions
        else:  # doubling: a row growing one position per step reallocates a few times, not at every step
            positions = min(self.max_seq_len, max(positions, 2 * self.positions))
        shape = (self.n_layers, max(rows, self.capacity), positions, self.n_heads, self.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)  # attention reads masked positions: keep them finite
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self._k is not None:
            b, filled = len(self.lengths), max(self.lengths, default=0)
            k[:, :b, :filled], v[:, :b, :filled] = self._k[:, :b, :filled], self._v[:, :b, :filled]
        self._k, self._v = k, v

    def _set_lengths(self, lengths):
        # The host copy is what the model reads: reading cache_seqlens back would sync with the GPU every layer.
        self.lengths = lengths
        self.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=self.device)


# -----------------------------------------------------------------------------
# Sampling

# torch.argmax on CPU is a scalar loop (about 2 ns per element here: 0.5 ms for 8 rows of a 32,768-token
# vocabulary, 2 ms for 32), while amax is vectorised. Rows at least this long are reduced in chunks:
# 5x faster at 8 x 32,768 on a 2-core EPYC, the same index.
_ARGMAX_CHUNK = 256


def argmax_rows(logits):
    """torch.argmax(logits, dim=-1, keepdim=True) for (B, V) logits, the FIRST maximal index of each row (NaN
    counts as the maximum), computed in chunks on CPU when V is a multiple of _ARGMAX_CHUNK (two at least)."""
    B, V = logits.shape
    if logits.device.type != "cpu" or V % _ARGMAX_CHUNK or V < 2 * _ARGMAX_CHUNK:
        return torch.argmax(logits, dim=-1, keepdim=True)
    chunks = logits.reshape(B, V // _ARGMAX_CHUNK, _ARGMAX_CHUNK)  # (B, V / chunk, chunk)
    best = chunks.amax(dim=-1).argmax(dim=-1, keepdim=True)  # (B, 1): earlier chunks all hold smaller values
    inside = chunks.gather(1, best.unsqueeze(-1).expand(B, 1, _ARGMAX_CHUNK)).squeeze(1)  # (B, chunk)
    return best * _ARGMAX_CHUNK + inside.argmax(dim=-1, keepdim=True)


def top_p_filter(logits, top_p, temperature):
    """Logits (B, V) with every token outside the nucleus set to -inf: the smallest set of most likely tokens
    whose probability, at this temperature, reaches top_p (the most likely token always stays)."""
    if top_p >= 1.0 or temperature <= 0:
        return logits
    probs = F.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V) each
    # A token stays if the tokens more likely than it do not yet reach top_p.
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    outside[:, 0] = False  # the most likely token stays even when top_p rounds to 0 in float32 (top_p=1e-300)
    mask = torch.zeros_like(outside).scatter(-1, order, outside)
    return logits.masked_fill(mask, float("-inf"))


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=1.0):
    """One token per row from logits (B, V) -> (B, 1) int64. rng: one generator for every row, or [(generator,
    rows), ...] for consecutive blocks of rows, each drawing what it would draw alone. temperature 0 is greedy (no
    softmax, top_k and top_p ignored); top_k None or <= 0 and top_p 1.0 sample from the full softmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return argmax_rows(logits)
    logits, indices = top_p_filter(logits, top_p, temperature), None
    if top_k is not None and top_k > 0:
        logits, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (B, k) each
    probs = F.softmax(logits / temperature, dim=-1)
    if not torch.isfinite(probs).all():
        raise RuntimeError("the model's logits hold NaN or inf: nothing can be sampled from them")
    # torch.multinomial(probs, 1, generator) takes argmax(probs / q) with q ~ Exp(1) drawn from the generator.
    # Drawing each block's q from its own generator gives the same tokens in three kernels for the whole batch,
    # where a multinomial per generation costs about ten (tests pin the equality).
    q = torch.empty_like(probs)
    start = 0
    for generator, rows in [(rng, len(probs))] if rng is None or isinstance(rng, torch.Generator) else rng:
        q[start:start + rows].exponential_(generator=generator)
        start += rows
    choice = (probs / q).argmax(dim=-1, keepdim=True)  # (B, 1)
    return choice if indices is None else indices.gather(-1, choice)


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
    lowered = expr.lower()
    return all(c in _STRING_CHARS for c in expr) and not any(w in lowered for w in _FORBIDDEN_WORDS) and ".count(" in expr


def _evaluate_expression(expr):
    """Parse and evaluate; None for anything that fails (syntax, division by zero, rejected node...)."""
    try:
        value = _evaluate_node(ast.parse(expr.strip(), mode="eval"))
        str(value)  # raises ValueError for ints past Python's digit limit; the engine needs the text
        return value
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, MemoryError, RecursionError):
        return None


def use_calculator(expr, timeout=CALCULATOR_TIMEOUT):
    """The model's calculator tool: the value of `expr` (arithmetic + - * / // on numbers, commas ignored, or
    `'word'.count('letter')`), or None when it is not allowed, fails or takes over `timeout` seconds."""
    if not isinstance(expr, str):
        raise TypeError(f"the calculator takes a str, got {type(expr).__name__}")
    expr = expr.replace(",", "")
    if not _calculator_allows(expr):
        return None
    # A thread, not a signal alarm, so that the timeout works off the main thread too; nothing is ever passed to
    # eval(): the expression is parsed and walked over a whitelist of AST nodes.
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_evaluate_expression(expr)), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        logger.warning("calculator gave up on %r after %.1f s", expr[:80], timeout)
        return None
    return outcome[0]


# -----------------------------------------------------------------------------
# The decode loop


def stop_tokens(tokenizer, other_turns=False):
    """The token ids that end a sample: <|assistant_end|> and <|bos|> (none without a tokenizer). other_turns adds
    the tokens that frame another turn, since a model that writes <|user_start|> has begun to make up the user's."""
    if tokenizer is None:
        return frozenset()
    names = ("<|assistant_end|>", *(("<|user_start|>", "<|user_end|>", "<|assistant_start|>") if other_turns else ()))
    return frozenset([tokenizer.get_bos_token_id(), *map(tokenizer.encode_special, names)])


def generation_budget(tokens, num_samples, max_tokens, temperature, top_p, context_len, fixed_context):
    """Check a generation's arguments; returns how many tokens it may generate: max_tokens, or (None) up to
    context_len. fixed_context: the cache holds context_len positions whatever max_tokens says (a running batch)."""
    if not isinstance(tokens, list) or not tokens or not all(_is_number(t) and isinstance(t, int) for t in tokens):
        raise ValueError("tokens must be a non-empty list of int token ids")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
        raise ValueError(f"max_tokens must be None or an int >= 0, got {max_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    room = context_len - len(tokens)
    if room <= 0 and (fixed_context or max_tokens is None):
        raise ValueError(f"the prompt ({len(tokens)} tokens) leaves no room in the context of {context_len}; shorten it"
                         + ("" if fixed_context else " or pass max_tokens explicitly"))
    return room if max_tokens is None else max_tokens


def model_device(model):
    """The device a model computes on: get_device() when it has one (GPT), else its first parameter or buffer."""
    if hasattr(model, "get_device"):
        return model.get_device()
    return next((t.device for t in itertools.chain(model.parameters(), model.buffers())), torch.device("cpu"))


def last_logits(model, ids, kv_cache):
    """Logits (B, V) of the last position of ids (B, T), advancing kv_cache by T."""
    kv_cache.reserve(ids.size(0), max(kv_cache.lengths, default=0) + ids.size(1))  # a batch's cache grows with its rows
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        # GPT: the head on the last position only; over a whole prompt it would cost a (T, n_embd) x (n_embd, V)
        # matmul and a (T, V) fp32 tensor for nothing. Other models (the tests' mocks) go through forward.
        return model.logits(model.hidden_states(ids, kv_cache)[:, -1])
    return model.forward(ids, kv_cache=kv_cache)[:, -1, :]


class Generation:
    """One prompt's samples in a DecodeBatch. column, masks: each sample's token of the last step (mask 1 sampled,
    0 forced by the tool; an ended sample repeats its stop token with mask 0). finish_reasons: per sample, None
    while it runs, then "stop" (a stop token), "length" (the budget or the context) or "cancelled". deliver: called
    with each column as soon as it is drawn (None: read `column` after the step)."""

    def __init__(self, tokens, num_samples, budget, temperature, top_k, top_p, seed, stop_tokens, deliver=None):
        self.tokens, self.num_samples, self.budget, self.stop_tokens = tokens, num_samples, budget, stop_tokens
        self.deliver = deliver
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        # Per sample: the stop token it ended on, the tokens the calculator still has to write (one per step, in
        # place of the sampled one), and the token ids since <|python_start|> while a tool call is open.
        self.terminal, self.expressions = [None] * num_samples, [None] * num_samples
        self.forced = [collections.deque() for _ in range(num_samples)]
        self.finish_reasons = [None] * num_samples
        self.rng = self.column = self.masks = None
        self.steps, self.finished = 0, False

    def finish(self, reason):
        """End the samples still running with `reason` (None: leave them None, as an error does)."""
        self.finish_reasons = [r or reason for r in self.finish_reasons]
        self.finished = True


class DecodeBatch:
    """Rows of one or more Generations in one KVCache of `seq_len` positions, each row at its own position, moved
    on by one forward pass per step. A generation's samples sit in adjacent rows in sample order, so it samples
    from one slice of the step's logits with its own generator and settings: the tokens it gets alone."""

    def __init__(self, model, tokenizer=None, seq_len=None, kv_dtype=None):
        self.model, self.tokenizer = model, tokenizer
        self.device = model_device(model)
        self.kv_dtype = kv_dtype if kv_dtype is not None else getattr(model, "compute_dtype", None)
        self.stop_tokens = stop_tokens(tokenizer)
        self.tool = None if tokenizer is None else {
            name: tokenizer.encode_special(f"<|{name}|>") for name in ("python_start", "python_end", "output_start", "output_end")}
        self.context_len = seq_len or model.config.sequence_len
        self.cache = self.new_cache(0, self.context_len)  # rows come with their generations (add_rows)
        self.rows = []  # per cache row: (generation, sample index)
        self.running = []  # the generations with rows here, in row order
        self.steps = 0  # batched forwards run so far

    def new_cache(self, rows, seq_len):
        cfg = self.model.config
        return KVCache(rows, cfg.n_kv_head, seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer, self.device, self.kv_dtype)

    def admit(self, gen):
        """Prefill gen's prompt at batch 1, copy it into one row per sample and draw its first column (nothing for
        a budget of 0)."""
        if gen.budget == 0:
            return gen.finish("length")
        gen.rng = torch.Generator(device=self.device)
        gen.rng.manual_seed(gen.seed)
        prefill = self.new_cache(1, len(gen.tokens))
        ids = torch.tensor([gen.tokens], dtype=torch.long, device=self.device)  # (1, T)
        logits = last_logits(self.model, ids, prefill)  # (1, V)
        self.cache.add_rows(prefill, gen.num_samples)
        self.rows += [(gen, s) for s in range(gen.num_samples)]
        self.running.append(gen)
        # Expanding the logits (not a sampled token) lets every sample draw its own first token.
        self._sample(logits.expand(gen.num_samples, -1), [(gen, range(gen.num_samples))])

    def step(self):
        """One forward over every row, then a column for every running generation; returns those generations."""
        ids = torch.tensor([[gen.column[s]] for gen, s in self.rows], dtype=torch.long, device=self.device)  # (B, 1)
        logits = last_logits(self.model, ids, self.cache)  # (B, V)
        self.steps += 1
        # A generation's rows are adjacent, in sample order.
        work = [(gen, [s for _, s in rows]) for gen, rows in itertools.groupby(self.rows, key=lambda row: row[0])]
        self._sample(logits, work)
        return [gen for gen, _ in work]

    def _sample(self, logits, work):
        """A token for each row of `logits` (B, V): the rows of the (generation, samples) pairs of `work`, in order."""
        drawn, start = [], 0
        # Consecutive generations with the same settings sample in one call, each from its own generator.
        for settings, block in itertools.groupby(work, key=lambda w: (w[0].temperature, w[0].top_k, w[0].top_p)):
            rngs = [(gen.rng, len(samples)) for gen, samples in block]
            rows = sum(n for _, n in rngs)
            drawn.append(sample_next_token(logits[start:start + rows], rngs, *settings))
            start += rows
        sampled = iter(torch.cat(drawn)[:, 0].tolist())  # (B, 1) -> B ints: one host sync for the whole batch
        for gen, samples in work:
            # An ended sample (no row any more) repeats its stop token with mask 0.
            gen.column, gen.masks = list(gen.terminal), [0] * gen.num_samples
            for s in samples:
                # A forced token (the calculator's output) replaces the one drawn for its row, which still drew one
                # to keep the generator in step.
                token = next(sampled)
                if gen.forced[s]:
                    token = gen.forced[s].popleft()
                else:
                    gen.masks[s] = 1
                gen.column[s] = token
                if token in gen.stop_tokens:
                    gen.terminal[s], gen.finish_reasons[s] = token, "stop"
                elif self.tool is not None:
                    self._track_tool_call(gen, s, token)
            gen.steps += 1
            ended = all(t is not None for t in gen.terminal)
            if ended or gen.steps >= gen.budget or len(gen.tokens) + gen.steps >= self.cache.max_seq_len:
                gen.finish("length")
            if gen.deliver is not None:  # straight from the draw: the column passes no other frame on its way out
                gen.deliver(gen.column)
        self.drop_ended()

    def drop_ended(self):
        """Rows of finished generations and of ended samples leave; the others keep their order."""
        keep = [i for i, (gen, s) in enumerate(self.rows) if not gen.finished and gen.terminal[s] is None]
        if len(keep) < len(self.rows):
            self.cache.keep_rows(keep)
            self.rows = [self.rows[i] for i in keep]
        self.running = [gen for gen in self.running if not gen.finished]

    def _track_tool_call(self, gen, s, token):
        """The calculator for sample s that wrote `token`: collect the expression between <|python_start|> and
        <|python_end|>, then queue its result as forced tokens."""
        tool, expression = self.tool, gen.expressions[s]
        if token == tool["python_start"]:
            gen.expressions[s] = []
        elif expression is not None and token == tool["python_end"]:
            gen.expressions[s] = None
            result = use_calculator(self.tokenizer.decode(expression)) if expression else None
            if result is not None:
                gen.forced[s].extend([tool["output_start"], *self.tokenizer.encode(str(result)), tool["output_end"]])
        elif expression is not None:
            expression.append(token)


class Engine:
    """KV-cached generation with the calculator tool, for a model and its tokenizer (None: raw token streams, no
    stop tokens, no tools). kv_dtype defaults to the dtype the model computes keys and values in."""

    def __init__(self, model, tokenizer=None, kv_dtype=None):
        self.model, self.tokenizer = model, tokenizer
        self.kv_dtype = kv_dtype if kv_dtype is not None else getattr(model, "compute_dtype", None)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Stream (token_column, token_masks) per step, lists of num_samples (mask 1 = sampled, 0 = forced by the
        calculator), for at most max_tokens steps (None: until the context is full). A sample that ends (at
        <|assistant_end|> or <|bos|>) repeats its stop token with mask 0 while the others go on."""
        budget = generation_budget(tokens, num_samples, max_tokens, temperature, 1.0, self.model.config.sequence_len, False)
        batch = DecodeBatch(self.model, self.tokenizer, len(tokens) + budget, self.kv_dtype)
        gen = Generation(tokens, num_samples, budget, temperature, top_k, 1.0, seed, batch.stop_tokens)
        batch.admit(gen)
        while gen.column is not None:
            yield gen.column, gen.masks
            if gen.finished:
                return
            batch.step()  # no forward once every sample has ended: nobody would use its logits

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run generate to the end: (results, masks), per sample the prompt + generated tokens and a mask that is 0
        over the prompt, then 1 sampled / 0 forced. The stop token that ends a sample is not included."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        stops = stop_tokens(self.tokenizer)
        for column, column_masks in self.generate(tokens, num_samples=num_samples, **kwargs):
            for row, mask, token, column_mask in zip(results, masks, column, column_masks):
                if token not in stops:  # a sample's stop token is where it ended; it repeats it afterwards
                    row.append(token)
                    mask.append(column_mask)
        return results, masks


# -----------------------------------------------------------------------------
# Greedy smell tests


# The fixed prompts whose greedy completions base_train, base_eval and base_loss print as a smell test.
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def complete_prompts(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """Greedy completions (decoded, BOS included) of each prompt, one batch-1 generation per prompt."""
    engine, bos = Engine(model, tokenizer), tokenizer.get_bos_token_id()
    texts = []
    for prompt in prompts:
        rows, _ = engine.generate_batch(tokenizer.encode(prompt, prepend=bos), max_tokens=max_tokens, temperature=0)
        texts.append(tokenizer.decode(rows[0]))
    return texts


def unconditioned_samples(model, tokenizer, num_samples=8, max_tokens=128, temperature=1.0):
    """Samples from BOS alone: what the model writes when nobody asks it anything."""
    bos = tokenizer.get_bos_token_id()
    rows, _ = Engine(model, tokenizer).generate_batch([bos], num_samples=num_samples, max_tokens=max_tokens, temperature=temperature)
    return [tokenizer.decode(row) for row in rows]
