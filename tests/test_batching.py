"""nanochat/batching.py: continuous batching. The reference is each request run alone: a batch of requests with
different prompt lengths, joining and leaving at different steps, must give every request exactly the tokens
Engine.generate gives it on its own (greedy, and seeded sampling), on scrambled tiny GPTs with GQA and with a
short sliding window; plus the model step on rows at different positions against each row alone, the
calculator per row, cancels, full contexts, queueing, threads and errors."""

import copy
import os
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from conftest import SmallVocabTokenizer
from nanochat.batching import END, BatchScheduler
from nanochat.engine import Engine, KVCache, stop_tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# GQA (4 query heads on 2 kv heads), and a short window: sequence_len 512 makes "S" layers attend 128 keys, and
# the prompts below start decoding on both sides of that, so rows cross it at different steps.
MODELS = {
    "gqa": dict(n_layer=3, n_head=4, n_kv_head=2, seed=0),
    "short_window": dict(n_layer=2, n_head=4, n_kv_head=1, sequence_len=512, window_pattern="SL", seed=1),
}
PROMPT_LENGTHS = {"gqa": (3, 11, 26, 7), "short_window": (100, 140, 121, 9)}


@pytest.fixture(params=sorted(MODELS))
def model_case(request, tiny_gpt):
    """(scrambled tiny GPT, prompts of different lengths) for each model shape."""
    model = tiny_gpt(scrambled=True, **MODELS[request.param])
    gen = torch.Generator().manual_seed(7)
    prompts = [[256] + torch.randint(0, 256, (n - 1,), generator=gen).tolist() for n in PROMPT_LENGTHS[request.param]]
    return model, prompts


def drive(scheduler, arrivals):
    """Submit each (step, submit kwargs) at its step and run the scheduler by hand until every request is done.
    Returns (columns per request, the Request objects, the batch's row lengths after each step)."""
    columns = [[] for _ in arrivals]
    requests = [None] * len(arrivals)
    lengths, step = [], 0
    while step <= max(at for at, _ in arrivals) or not all(r.done.is_set() for r in requests):
        for i, (at, kwargs) in enumerate(arrivals):
            if at == step:
                requests[i] = scheduler.submit(deliver=columns[i].append, **kwargs)
        scheduler.step()
        lengths.append(list(scheduler.cache.lengths))
        step += 1
        assert step < 1000
    for cols in columns:
        assert cols.pop() is END
    return columns, requests, lengths


def alone(model, tokenizer, prompt, **kwargs):
    """Engine.generate's columns for one request on its own (its own batch, its own cache)."""
    return [column for column, _ in Engine(model, tokenizer).generate(prompt, **kwargs)]


# -----------------------------------------------------------------------------
# The model on rows at different positions


def test_one_forward_on_rows_at_different_positions_equals_each_row_alone(model_case):
    model, prompts = model_case
    cfg = model.config
    batch = KVCache(0, cfg.n_kv_head, cfg.sequence_len, cfg.n_embd // cfg.n_head, cfg.n_layer, "cpu", torch.float32)
    singles = []
    with torch.no_grad():
        for prompt in prompts:
            cache = KVCache(1, cfg.n_kv_head, len(prompt) + 8, cfg.n_embd // cfg.n_head, cfg.n_layer, "cpu", torch.float32)
            model(torch.tensor([prompt]), kv_cache=cache)
            batch.add_rows(cache)
            singles.append(cache)
        assert batch.get_pos() is None and batch.lengths == [len(p) for p in prompts]
        # A decode step, then a 3-token chunk: every row at its own position, in one forward each.
        for width in (1, 3):
            ids = torch.randint(0, 256, (len(prompts), width), generator=torch.Generator().manual_seed(width))
            together = model(ids, kv_cache=batch)[:, -1]  # (B, V)
            for row, cache in enumerate(singles):
                own = model(ids[row:row + 1], kv_cache=cache)[0, -1]
                torch.testing.assert_close(together[row], own, atol=2e-5, rtol=1e-5)
    assert batch.lengths == [len(p) + 4 for p in prompts]


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails any read of a tensor's values back to Python: on a GPU each one waits for the device."""

    READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__index__,
             torch.Tensor.__bool__, torch.Tensor.__float__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"a decode step read a tensor back to the host ({func.__name__})")
        return func(*args, **(kwargs or {}))


def test_ragged_decode_takes_the_row_lengths_from_the_host(tiny_gpt):
    model = tiny_gpt(scrambled=True, n_layer=2, window_pattern="SL", sequence_len=64)
    cfg = model.config
    batch = KVCache(0, cfg.n_kv_head, cfg.sequence_len, cfg.n_embd // cfg.n_head, cfg.n_layer, "cpu", torch.float32)
    with torch.no_grad():
        for n in (3, 9):
            cache = KVCache(1, cfg.n_kv_head, n, cfg.n_embd // cfg.n_head, cfg.n_layer, "cpu", torch.float32)
            model(torch.tensor([[256] * n]), kv_cache=cache)
            batch.add_rows(cache)
        batch.reserve(2, 10 + 1)  # room for the decode step: the rows brought only the positions they fill
        expected = model(torch.tensor([[1], [2]]), kv_cache=copy.deepcopy(batch))
        with _NoHostReads():
            logits = model(torch.tensor([[1], [2]]), kv_cache=batch)
    torch.testing.assert_close(logits, expected)
    assert batch.lengths == [4, 10]


def test_cache_rows_leave_in_order_and_memory_goes_with_the_last():
    batch = KVCache(0, 1, 16, 2, 1, "cpu", torch.float32)
    batch.reserve(4)
    sources = []
    for n in (3, 5, 7):
        cache = KVCache(1, 1, n, 2, 1, "cpu", torch.float32)
        cache.k_cache.fill_(n)
        cache.v_cache.fill_(-n)
        cache.advance(n)
        cache.prev_embedding = torch.full((1, 1, 4), float(n))
        sources.append(cache)
        batch.add_rows(cache)
    assert batch.capacity == 4 and batch.cache_seqlens.tolist() == [3, 5, 7]
    batch.keep_rows([1, 2])  # row 0 leaves: the others move up, in order
    assert batch.lengths == [5, 7] and batch.cache_seqlens.tolist() == [5, 7] and batch.capacity == 4
    assert (batch.k_cache[0, 1, :7] == 7).all() and (batch.v_cache[0, 0, :5] == -5).all()
    assert batch.prev_embedding[:, 0, 0].tolist() == [5.0, 7.0]
    batch.keep_rows([1])
    assert batch.get_pos() == 7
    batch.keep_rows([])
    assert batch.capacity == 0 and batch.prev_embedding is None and batch.get_pos() == 0


def test_a_batch_cache_stores_only_the_positions_its_rows_fill(tiny_gpt):
    # The batch's context is the model's (64 here, 2048 for a real one), but its storage holds what the rows use,
    # doubling as they grow; the tokens are those of a cache holding the whole context (the parity tests below).
    model = tiny_gpt(scrambled=True, sequence_len=64)
    scheduler = BatchScheduler(model, max_batch=2, worker=False)
    scheduler.submit([256] + [65] * 9, max_tokens=30, temperature=0.0, deliver=lambda item: None)
    scheduler.step()  # admission: the prompt's 10 positions
    assert scheduler.cache.positions == 10 and scheduler.cache.max_seq_len == 64
    scheduler.step()  # the first decode step needs 11: the storage doubles
    assert scheduler.cache.positions == 20 and scheduler.cache.lengths == [11]
    while scheduler.step():
        assert scheduler.cache.positions >= max(scheduler.cache.lengths)
    assert scheduler.cache.positions == 0  # an idle batch holds no memory
    with pytest.raises(RuntimeError, match="overflow"):
        KVCache(0, 1, 16, 2, 1, "cpu", torch.float32).reserve(1, 17)


# -----------------------------------------------------------------------------
# The scheduler against each request alone


def test_greedy_requests_joining_and_leaving_get_their_tokens_alone(model_case):
    model, prompts = model_case
    budgets = (30, 12, 25, 40)
    arrivals = [(at, dict(tokens=p, max_tokens=m, temperature=0.0)) for at, p, m in zip((0, 0, 4, 9), prompts, budgets)]
    columns, requests, lengths = drive(BatchScheduler(model, max_batch=8, worker=False), arrivals)
    for prompt, budget, cols, req in zip(prompts, budgets, columns, requests):
        assert cols == alone(model, None, prompt, max_tokens=budget, temperature=0.0)
        assert len(cols) == budget and req.finish_reasons == ["length"]
    assert any(len(set(step)) == len(step) == 4 for step in lengths), "four rows, each at its own position"
    assert lengths[-1] == []
    assert len({tuple(c) for cols in columns for c in cols}) > 10, "the scrambled model should not be stuck"


def test_seeded_sampling_is_the_same_batched_as_alone(model_case):
    model, prompts = model_case
    settings = [dict(temperature=1.0, top_k=20, seed=1), dict(temperature=0.7, top_k=None, seed=2),
                dict(temperature=1.3, top_k=5, seed=3), dict(temperature=1.0, top_k=50, seed=4)]
    arrivals = [(at, dict(tokens=p, max_tokens=20, **s)) for at, p, s in zip((0, 2, 2, 5), prompts, settings)]
    columns, _, _ = drive(BatchScheduler(model, max_batch=4, worker=False), arrivals)
    for prompt, s, cols in zip(prompts, settings, columns):
        assert cols == alone(model, None, prompt, max_tokens=20, **s)


def test_top_p_is_the_same_batched_as_alone(tiny_gpt):
    model = tiny_gpt(scrambled=True, n_head=4, n_kv_head=2)
    prompts = [[256, 1, 2], [256, 9, 8, 7, 6, 5]]
    kwargs = [dict(temperature=1.0, top_p=0.6, seed=5, max_tokens=15), dict(temperature=0.9, top_p=0.9, seed=6, max_tokens=15)]
    together, _, _ = drive(BatchScheduler(model, max_batch=2, worker=False),
                           [(0, dict(tokens=p, **k)) for p, k in zip(prompts, kwargs)])
    for prompt, k, cols in zip(prompts, kwargs, together):
        (own,), _, _ = drive(BatchScheduler(model, max_batch=1, worker=False), [(0, dict(tokens=prompt, **k))])
        assert cols == own
    nucleus, _, _ = drive(BatchScheduler(model, worker=False),
                          [(0, dict(tokens=prompts[0], temperature=1.0, top_p=1e-6, seed=3, max_tokens=10))])
    assert nucleus[0] == alone(model, None, prompts[0], max_tokens=10, temperature=0.0)  # a tiny nucleus is greedy


def test_samples_of_one_request_stop_apart_and_match_engine_generate(tiny_gpt):
    model = tiny_gpt(scrambled=True, vocab_size=16, n_layer=3, n_head=4, n_kv_head=2, seed=3)
    tokenizer = SmallVocabTokenizer()
    first, second = [6, 1, 2, 3, 4, 7, 8], [6, 9, 10]
    arrivals = [(0, dict(tokens=first, num_samples=4, max_tokens=25, temperature=1.0, seed=11)),
                (3, dict(tokens=second, num_samples=2, max_tokens=25, temperature=1.0, seed=12))]
    columns, requests, lengths = drive(BatchScheduler(model, tokenizer, max_batch=8, worker=False), arrivals)
    assert columns[0] == alone(model, tokenizer, first, num_samples=4, max_tokens=25, temperature=1.0, seed=11)
    assert columns[1] == alone(model, tokenizer, second, num_samples=2, max_tokens=25, temperature=1.0, seed=12)
    assert "stop" in requests[0].finish_reasons
    assert len({len(step) for step in lengths}) > 3, "rows left the batch one by one"


def test_the_calculator_runs_per_row(byte_tokenizer):
    # A model that writes SCRIPT[p] at absolute position p: rows whose prompts differ in length are at different
    # points of the script, and the calculator's forced output shifts each row differently.
    special = byte_tokenizer.encode_special
    script = [*b"ab", special("<|python_start|>"), *b"6*7", special("<|python_end|>"), *b"xy"]

    class ScriptedModel:
        config = SimpleNamespace(sequence_len=96, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        compute_dtype = torch.float32

        def get_device(self):
            return torch.device("cpu")

        def forward(self, ids, kv_cache=None):
            B, T = ids.shape
            logits = torch.zeros(B, T, 265)
            for b, end in enumerate((kv_cache.cache_seqlens + T).tolist()):
                logits[b, -1, script[end % len(script)]] = 100.0
            kv_cache.advance(T)
            return logits

    model, bos = ScriptedModel(), byte_tokenizer.get_bos_token_id()
    prompts = [[bos, 65], [bos, 65, 66, 67, 68]]
    columns, _, _ = drive(BatchScheduler(model, byte_tokenizer, worker=False),
                          [(0, dict(tokens=p, max_tokens=24, temperature=0.0)) for p in prompts])
    for prompt, cols in zip(prompts, columns):
        assert cols == alone(model, byte_tokenizer, prompt, max_tokens=24, temperature=0.0)
        text = byte_tokenizer.decode([c[0] for c in cols])
        assert "<|output_start|>42<|output_end|>" in text
    assert columns[0] != columns[1]


class BranchingModel:
    """A mock whose next token follows from each row's last one, so a seeded first draw picks a row's fate: 'a' then
    <|assistant_end|>; 'b' then a calculator call "6*7", its forced output, then <|bos|>; 'c' for ever. Any other
    token is followed by 'z' (the calculator's output replaces those)."""

    config = SimpleNamespace(sequence_len=96, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
    compute_dtype = torch.float32

    def __init__(self, tokenizer):
        sp = tokenizer.encode_special
        path = [ord("b"), sp("<|python_start|>"), *b"6*7", sp("<|python_end|>")]
        self.next = {ord("a"): sp("<|assistant_end|>"), ord("c"): ord("c"), sp("<|output_end|>"): sp("<|bos|>"),
                     **dict(zip(path, path[1:]))}

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        logits = torch.full((B, T, 265), float("-inf"))
        for b, last in enumerate(ids[:, -1].tolist()):
            if T > 1:  # the prompt: a seeded coin with three sides per sample
                logits[b, -1, [ord("a"), ord("b"), ord("c")]] = 0.0
            else:
                logits[b, -1, self.next.get(last, ord("z"))] = 0.0
        kv_cache.advance(T)
        return logits


def test_engine_generate_and_a_batched_request_end_rows_alike(byte_tokenizer):
    """Engine.generate and the scheduler once decoded in two copies kept in step by comments; the same columns,
    masks (the calculator's output 0) and ends (a stop token repeated with mask 0, the budget, max_tokens=0) hold
    them together, with another request joining the batch at different positions."""
    model, bos = BranchingModel(byte_tokenizer), byte_tokenizer.get_bos_token_id()
    prompt, other = [bos, *b"Hi"], [bos, *b"a longer prompt"]
    kwargs = dict(num_samples=6, max_tokens=16, temperature=1.0, seed=3)
    alone_columns = list(Engine(model, byte_tokenizer).generate(prompt, **kwargs))
    scheduler, got, box = BatchScheduler(model, byte_tokenizer, worker=False), [], {}
    box["request"] = scheduler.submit(prompt, deliver=lambda c: c is END or got.append((c, box["request"].masks)), **kwargs)
    scheduler.step()
    scheduler.step()
    scheduler.submit(other, num_samples=2, max_tokens=5, temperature=1.0, seed=5)
    while scheduler.step():
        pass
    assert got == alone_columns
    first = alone_columns[0][0]
    assert set(first) == {ord("a"), ord("b"), ord("c")}, "seed 3 should give every kind of row"
    ends = {ord("a"): "stop", ord("b"): "stop", ord("c"): "length"}
    assert box["request"].finish_reasons == [ends[token] for token in first]
    b = first.index(ord("b"))
    text = byte_tokenizer.decode([column[b] for column, _ in alone_columns])
    assert text.startswith("b<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|><|bos|><|bos|>")
    assert [masks[b] for _, masks in alone_columns][:10] == [1] * 6 + [0] * 4  # forced tokens are mask 0
    a = first.index(ord("a"))
    assert [column[a] for column, _ in alone_columns][1:] == [byte_tokenizer.encode_special("<|assistant_end|>")] * 15
    assert [masks[a] for _, masks in alone_columns][1:] == [1] + [0] * 14  # sampled once, then repeated
    # Nothing to generate: no column on either path.
    assert list(Engine(model, byte_tokenizer).generate(prompt, max_tokens=0)) == []
    nothing = []
    empty = scheduler.submit(prompt, max_tokens=0, deliver=nothing.append)
    scheduler.step()
    assert nothing == [END] and empty.finish_reasons == ["length"]


def test_every_caller_stops_on_the_one_stop_token_set(byte_tokenizer, tiny_gpt):
    from nanochat.rl import sample_answers
    from nanochat.serving import Replica, Reply

    stops = stop_tokens(byte_tokenizer)
    assert stops == {byte_tokenizer.get_bos_token_id(), byte_tokenizer.encode_special("<|assistant_end|>")}
    turns = {byte_tokenizer.encode_special(f"<|{name}|>") for name in ("user_start", "user_end", "assistant_start")}
    assert stop_tokens(byte_tokenizer, other_turns=True) == stops | turns and stop_tokens(None) == frozenset()
    model = tiny_gpt()
    assert BatchScheduler(model, byte_tokenizer, worker=False).stop_tokens == stops
    replica = Replica(model, byte_tokenizer)
    assert replica.stop_tokens == Reply(byte_tokenizer).ends == stops | turns
    replica.close()
    # Engine.generate_batch leaves out exactly the token a sample ended on; RL keeps it and calls the answer finished.
    end = byte_tokenizer.encode_special("<|assistant_end|>")
    engine = Engine(BranchingModel(byte_tokenizer), byte_tokenizer)
    prompt = [byte_tokenizer.get_bos_token_id(), *b"Hi"]
    rows, _ = engine.generate_batch(prompt, num_samples=6, max_tokens=16, temperature=1.0, seed=3)
    answers = sample_answers(engine, byte_tokenizer, prompt, 6, 16, 1.0, None, seed=3)
    for row, (answer, _, finished) in zip(rows, answers):
        assert finished == (answer[-1] in stops) and (answer[:-1] if finished else answer) == row[len(prompt):]
        assert not stops & set(row[len(prompt):]) and (answer[-1] == end) == (answer[0] == ord("a"))


# -----------------------------------------------------------------------------
# Joining, leaving, limits


def test_a_request_waits_for_room_and_rows_free_their_slots(tiny_gpt):
    model = tiny_gpt(scrambled=True)
    scheduler = BatchScheduler(model, max_batch=3, worker=False)
    a = scheduler.submit([256, 1], max_tokens=5, temperature=0.0)
    b = scheduler.submit([256, 2, 3], num_samples=2, max_tokens=9, temperature=0.0)
    c = scheduler.submit([256, 4], max_tokens=3, temperature=0.0)  # 1 + 2 + 1 rows > 3: waits
    scheduler.step()
    assert scheduler.stats() == {"max_batch": 3, "active_rows": 3, "running_requests": 2, "queued_requests": 1}
    for _ in range(3):
        scheduler.step()
    assert not a.done.is_set() and scheduler.stats()["queued_requests"] == 1
    scheduler.step()  # a's fifth token: it leaves, and c joins in the same step
    assert a.done.is_set() and a.finish_reasons == ["length"]
    assert scheduler.stats() == {"max_batch": 3, "active_rows": 3, "running_requests": 2, "queued_requests": 0}
    while scheduler.step():
        pass
    assert b.done.is_set() and c.done.is_set() and scheduler.cache.capacity == 0  # an idle batch holds no memory


def test_a_column_is_delivered_from_the_draw_before_the_next_prefill(tiny_gpt, monkeypatch):
    # The served token's path: the sampler hands each column straight to the request's callback (no frame of
    # the scheduler's step in between), and a running request's column goes out before a newcomer's prefill.
    model = tiny_gpt(scrambled=True)
    scheduler = BatchScheduler(model, max_batch=4, worker=False)
    events, prefill = [], scheduler.admit

    def deliver(name):
        def take(item):
            if item is not END:
                events.append((name, sys._getframe(1).f_code.co_name))
        return take

    monkeypatch.setattr(scheduler, "admit", lambda gen: (events.append(("prefill", None)), prefill(gen)))
    scheduler.submit([256, 1], max_tokens=3, temperature=0.0, deliver=deliver("a"))
    scheduler.step()
    scheduler.submit([256, 2, 3], max_tokens=2, temperature=0.0, deliver=deliver("b"))
    while scheduler.step():
        pass
    assert events == [("prefill", None), ("a", "_sample"), ("a", "_sample"), ("prefill", None), ("b", "_sample"),
                      ("a", "_sample"), ("b", "_sample")]


def test_the_cache_doubles_up_to_max_batch_and_is_freed_when_idle(tiny_gpt):
    scheduler = BatchScheduler(tiny_gpt(), max_batch=6, worker=False)
    capacities = []
    for rows in (1, 1, 1, 2):  # 1, 2, 3, 5 rows in the batch
        scheduler.submit([256, 1], num_samples=rows, max_tokens=20, temperature=0.0)
        scheduler.step()
        capacities.append(scheduler.cache.capacity)
    assert capacities == [1, 2, 4, 6] and scheduler.stats()["active_rows"] == 5
    while scheduler.step():
        pass
    assert scheduler.cache.capacity == 0


def test_a_cancelled_request_leaves_at_once_and_the_others_are_unchanged(tiny_gpt):
    model = tiny_gpt(scrambled=True, n_head=4, n_kv_head=2)
    scheduler = BatchScheduler(model, worker=False)
    keep, drop = [], []
    kept = scheduler.submit([256, 5, 6, 7], max_tokens=20, temperature=0.0, deliver=keep.append)
    dropped = scheduler.submit([256, 9], max_tokens=20, temperature=0.0, deliver=drop.append)
    for _ in range(5):
        scheduler.step()
    dropped.cancel()
    scheduler.step()
    assert dropped.finish_reasons == ["cancelled"] and drop[-1] is END and len(drop) == 6
    assert scheduler.stats()["active_rows"] == 1
    while scheduler.step():
        pass
    assert keep[:-1] == alone(model, None, [256, 5, 6, 7], max_tokens=20, temperature=0.0)
    assert kept.finish_reasons == ["length"] and keep[-1] is END
    steps, queued = scheduler.steps, scheduler.submit([256], max_tokens=4)
    queued.cancel()
    assert scheduler.step() == 0 and queued.finish_reasons == ["cancelled"] and scheduler.steps == steps


def test_a_full_context_ends_the_row_with_length(tiny_gpt):
    model = tiny_gpt(scrambled=True)  # sequence_len 64
    scheduler = BatchScheduler(model, worker=False)
    columns, requests, _ = drive(scheduler, [(0, dict(tokens=[256] * 60, max_tokens=100, temperature=0.0)),
                                             (0, dict(tokens=[256] * 10, max_tokens=None, temperature=0.0))])
    assert len(columns[0]) == 4 and len(columns[1]) == 54  # prompt + reply fill the 64 tokens exactly
    assert requests[0].finish_reasons == requests[1].finish_reasons == ["length"]
    assert columns[1] == alone(model, None, [256] * 10, temperature=0.0)  # Engine.generate's max_tokens=None too
    with pytest.raises(ValueError, match="leaves no room"):
        scheduler.submit([256] * 64)


def test_bad_requests_are_refused_at_submit(tiny_gpt):
    scheduler = BatchScheduler(tiny_gpt(), worker=False)
    for kwargs, message in [(dict(tokens=[]), "non-empty list"), (dict(tokens=[1], num_samples=0), "num_samples"),
                            (dict(tokens=[1], max_tokens=-1), "max_tokens"), (dict(tokens=[1], temperature=-1), "temperature"),
                            (dict(tokens=[1], top_p=0.0), "top_p")]:
        with pytest.raises(ValueError, match=message):
            scheduler.submit(**kwargs)
    with pytest.raises(ValueError, match="max_batch"):
        BatchScheduler(tiny_gpt(), max_batch=0)


# -----------------------------------------------------------------------------
# The worker thread


def test_requests_from_many_threads_share_the_batch(tiny_gpt):
    model = tiny_gpt(scrambled=True, n_head=4, n_kv_head=2, seed=5)
    scheduler = BatchScheduler(model, max_batch=4)
    prompts = [[256] + list(range(1, n)) for n in (2, 9, 4, 13, 6, 20)]
    results = [None] * len(prompts)

    def user(i):
        results[i] = list(scheduler.submit(prompts[i], max_tokens=16, temperature=1.0, top_k=30, seed=i))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    scheduler.close()
    for i, prompt in enumerate(prompts):
        assert results[i] == alone(model, None, prompt, max_tokens=16, temperature=1.0, top_k=30, seed=i)


def test_leaving_the_loop_cancels_and_an_error_reaches_its_request(tiny_gpt):
    model = tiny_gpt(scrambled=True)

    class Failing:
        config, compute_dtype, fail = model.config, model.compute_dtype, False

        def get_device(self):
            return model.get_device()

        def forward(self, ids, kv_cache=None):
            if self.fail and ids.size(1) == 1:
                raise RuntimeError("the model broke")
            return model.forward(ids, kv_cache=kv_cache)

    failing = Failing()
    scheduler = BatchScheduler(failing, max_batch=2)
    request = scheduler.submit([256, 1, 2], max_tokens=50, temperature=0.0)
    for _ in request:
        break
    assert request.done.wait(10) and request.finish_reasons == ["cancelled"]
    failing.fail = True
    with pytest.raises(RuntimeError, match="the model broke"):
        list(scheduler.submit([256, 3], max_tokens=5))
    failing.fail = False
    assert len(list(scheduler.submit([256, 3], max_tokens=5))) == 5  # the scheduler goes on serving
    scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit([256])



def test_the_in_process_batch_bench_runs_and_compares_batched_replies_with_alone(monkeypatch):
    from bench import bench_batch_step

    monkeypatch.setenv("NANOCHAT_BASE_DIR", "unused")  # the bench points it at its temporary models; restored after
    threads = torch.get_num_threads()
    try:
        rows = bench_batch_step.main(["--depth", "1", "--streams", "3", "--max-tokens", "4", "--rounds", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [row["depth"] for row in rows] == [1] and rows[0]["ratio_median"] > 0 and rows[0]["batched_ms_per_step"] > 0
    assert rows[0]["agreement_min"] == 1.0  # a tiny model rounds alike batched and alone


def test_the_in_process_batch_bench_names_a_tree_without_nanochat(tmp_path):
    from bench import bench_batch_step

    with pytest.raises(SystemExit, match="no nanochat package there"):
        bench_batch_step.main(["--tree", str(tmp_path), "--depth", "1"])


def test_worker_threads_are_joined_before_the_interpreter_exits():
    # A script that leaves its request early and exits: the daemon worker must not still be inside a torch op
    # while the interpreter shuts down (runcpu.sh's chat reply once aborted that way). The script's own exit
    # handler, registered first, runs last and sees whether the worker is still alive.
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import atexit, threading
        atexit.register(lambda: print("worker alive at exit:", any(t.name == "nanochat-batch" and t.is_alive()
                                                                    for t in threading.enumerate())))
        import conftest
        from nanochat.batching import BatchScheduler
        request = BatchScheduler(conftest._make_tiny_gpt(scrambled=True)).submit([256, 1], max_tokens=40)
        next(iter(request))
    """)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir), tests_dir]), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "worker alive at exit: False" in result.stdout
