"""The test kit shared by every test file: a byte-level tokenizer, a tiny real GPT, a throwaway base dir,
and a runner that executes a function on N gloo ranks in-process, whose collectives must follow NCCL's device
rule (tests/nccl_rules.py).

    def test_x(byte_tokenizer, tiny_gpt, base_dir, run_on_ranks):
        model = tiny_gpt(scrambled=True)
        per_rank = run_on_ranks(_worker, str(base_dir))  # _worker(rank, world_size, base) at module level

Whole scripts under torchrun go through tests/dist_harness.py instead. The chat front ends (CLI, web server, UI)
share `chat_model_dir`, a base dir holding a micro chat model, and `chat_server`, that model served on loopback;
`serve_chat` starts more such servers with their own flags.
"""

import contextlib

import datetime
import functools
import os
import pickle
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nccl_rules
from dist_harness import free_port
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes


@pytest.fixture(autouse=True, scope="session")
def _matplotlib_cache_in_tmp(tmp_path_factory):
    """matplotlib (the report's plots) writes a font cache under ~/.cache unless told otherwise: tests leave ~ alone."""
    os.environ.setdefault("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed CPU the thread
    pool's spinning makes each tiny matmul ~100x slower. Use with pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A merge-free tokenizer: the 256 bytes plus the 9 specials (265 tokens, BOS = 256). Picklable, so a
    rank function can take it as an argument."""
    return RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})


def _make_tiny_gpt(vocab_size=265, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, sequence_len=64, window_pattern="L",
                   seed=0, scrambled=False, compute_dtype=torch.float32, device="cpu"):
    """A real GPT the way training builds one (meta device, to_empty, init_weights), seeded.

    compute_dtype=None takes nanochat.common.get_compute_dtype(), as a script's model would.
    scrambled: add noise to every matrix and open the smear gate. A fresh init has zero residual
    projections and a tiny lm_head, so its logits are near ties and smear, value embeddings, backout and
    GQA barely shape them; scrambled, greedy decoding is decisive and every feature counts.
    """
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=window_pattern)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=compute_dtype)
    model.to_empty(device=device)
    # init_weights draws from the global generator: fork it so the test's own stream is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()
    if scrambled:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    noise = torch.randn(p.shape, generator=gen) * (0.3 if "lm_head" in name else 0.1)
                    p.add_(noise.to(device=p.device, dtype=p.dtype))
            model.smear_lambda.fill_(0.8)
    return model


class SmallVocabTokenizer:
    """Specials for a 16-token model: rows end on token 5 (assistant_end) or 6 (bos), sampled often;
    the tool tokens lie outside the vocabulary, so no tool call ever happens."""

    ids = {"<|assistant_end|>": 5, "<|bos|>": 6, "<|python_start|>": 100, "<|python_end|>": 101,
           "<|output_start|>": 102, "<|output_end|>": 103}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return 6


class SlowModel:
    """A model `delay` seconds slower per forward pass, counting them; fail=True makes its decode steps
    (one new token per row) raise. For tests of serving under load, disconnects and streaming."""

    def __init__(self, model, delay=0.05, fail=False):
        self.model, self.config, self.compute_dtype = model, model.config, model.compute_dtype
        self.delay, self.fail, self.forwards = delay, fail, 0

    def get_device(self):
        return self.model.get_device()

    def forward(self, ids, kv_cache=None):
        time.sleep(self.delay)
        if self.fail and ids.size(1) == 1:
            raise RuntimeError("the model broke")
        self.forwards += 1
        return self.model.forward(ids, kv_cache=kv_cache)


@pytest.fixture
def tiny_gpt():
    """_make_tiny_gpt as a fixture: call it with the sizes the test needs."""
    return _make_tiny_gpt


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh, not yet created NANOCHAT_BASE_DIR under tmp_path."""
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


# -----------------------------------------------------------------------------
# A micro chat model, on disk and served

CHAT_CONTEXT = 128  # tokens: a few short turns overflow it, so the context trimming is exercised too


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, byte_tokenizer):
    """A base dir (not set as NANOCHAT_BASE_DIR: set it yourself) holding what `-i sft` loads: the byte tokenizer
    with its token_bytes, and a scrambled 2-layer GPT of context CHAT_CONTEXT as the SFT checkpoint d2, step 1."""
    base = tmp_path_factory.mktemp("chat_base")
    byte_tokenizer.save(str(base / "tokenizer"))
    torch.save(compute_token_bytes(byte_tokenizer), base / "tokenizer" / "token_bytes.pt")
    model = _make_tiny_gpt(sequence_len=CHAT_CONTEXT, scrambled=True)
    save_checkpoint(str(base / "chatsft_checkpoints" / "d2"), 1, model.state_dict(), None,
                    {"step": 1, "model_config": asdict(model.config)})
    return base


@contextlib.contextmanager
def _serving(base, *argv):
    """`scripts.chat_web` with `argv` serving the micro chat model from `base` on a port the OS picks, in a thread
    of this process. Yields .url, .app, .server (the uvicorn server) and .thread; stopped on exit."""
    from scripts import chat_web

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(base))
        server = chat_web.build_server(chat_web.build_parser().parse_args(["--device-type", "cpu", "--port", "0", *argv]))
    thread = threading.Thread(target=server.run, name="chat-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the chat server did not start")
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", app=server.config.app, server=server, thread=thread,
                              host=host)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def chat_server(chat_model_dir, tmp_path_factory):
    """`scripts.chat_web` serving the micro chat model on 127.0.0.1, with a conversation log; shut down after the
    session. Yields .url, .log_path and .app."""
    log_path = tmp_path_factory.mktemp("chat_log") / "conversations.jsonl"
    with _serving(chat_model_dir, "--host", "127.0.0.1", "--log-conversations", str(log_path)) as served:
        served.log_path = log_path
        yield served


@pytest.fixture
def serve_chat(chat_model_dir):
    """Start another chat server for this test: `with serve_chat("--api-key", "k") as served:` (see _serving);
    no --host given means the script's default address."""
    return functools.partial(_serving, chat_model_dir)


@pytest.fixture
def offline_tasks(tmp_path, monkeypatch):
    """No hub datasets, as on a machine without network: every task falls back at once to its offline stand-in
    (or is left out), and the once-per-process fallback notices start afresh."""
    from tasks import common, spellingbee

    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path / "no_task_data"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(common, "_fallbacks", {})
    monkeypatch.setattr(spellingbee, "_DOWNLOAD_FAILED", {})


# -----------------------------------------------------------------------------
# Optional extras (lm-eval, transformers) and a tiny trained model to export and evaluate


def require_extra(module, extra):
    """Import an optional extra's module, or skip (fail where NANOCHAT_REQUIRE_EXTRAS=1, as .ci/run sets it)."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        reason = f"{module} is not installed: `uv sync --extra {extra}` (CI installs it)"
        (pytest.fail if os.environ.get("NANOCHAT_REQUIRE_EXTRAS") == "1" else pytest.skip)(reason)


@pytest.fixture(scope="session")
def hf_offline(tmp_path_factory):
    """The Hugging Face libraries kept off the network and out of ~/.cache: hub and datasets offline, their caches
    and transformers' copy of remote model code under a tmp dir, for the whole session."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("HF_HOME", home), ("HF_MODULES_CACHE", home / "modules"), ("HF_DATASETS_CACHE", home / "datasets"),
                            ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
            patch.setenv(name, str(value))
        if "transformers" in sys.modules:  # imported before this fixture: point its module cache here too
            from transformers import dynamic_module_utils

            patch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(home / "modules"))
        yield home


BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A cat sat on the mat; the dog barked at the cat.\n",
    "def square(x):\n    return x ** 2  # numbers 12 345 6789\n",
    "Ünïcödé café naïve 日本語のテキスト 🙂 emoji, and    runs   of\tspaces\n\n\n",
    "Question: What is the capital of France? Answer: Paris. It's a city; they're here, we'll see.\n",
]


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A real BPE tokenizer trained by rustbpe on a small mixed corpus: 300 tokens (291 + 9 specials), with merges."""
    return RustBPETokenizer.train_from_iterator(iter(BPE_CORPUS * 20), 300)


@pytest.fixture(scope="session")
def trained_tiny_gpt(bpe_tokenizer):
    """A tiny GPT trained for a few steps on the BPE corpus, fp32 on CPU, with every feature the export must carry:
    GQA (4 heads, 2 kv heads), sliding windows (context 512, "SL": windows 128 and 512), value embeddings on
    layers 1 and 3, smear, backout, a padded vocab (300 -> 320). Scrambled first, so greedy decoding is decisive."""
    model = _make_tiny_gpt(vocab_size=bpe_tokenizer.get_vocab_size(), n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                           sequence_len=512, window_pattern="SL", scrambled=True)
    ids = bpe_tokenizer.encode("".join(BPE_CORPUS * 4), prepend="<|bos|>")
    x = torch.tensor([ids[:256]])
    y = torch.tensor([ids[1:257]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # plain AdamW: MuonAdamW's setup costs seconds here
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(5):
            model(x, y).backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
    return model.eval()


# -----------------------------------------------------------------------------
# N gloo ranks in-process


def _rank_main(rank, fn, world_size, port, args, out_dir, timeout):
    """One spawned rank: the torchrun environment, a gloo group around fn, its return value to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    # N ranks share a small CPU: intra-op threads would only oversubscribe it.
    torch.set_num_threads(1)
    # The group's own timeout makes a rank stuck in a collective fail with a message instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
    nccl_rules.install()  # gloo takes host tensors that NCCL refuses: hold the ranks to NCCL's rule
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn(fn, args, world_size, timeout, out_dir):
    """Start the ranks and wait for them: None when every rank succeeds, else a report on each failed rank."""
    ctx = mp.start_processes(_rank_main, args=(fn, world_size, free_port(), args, out_dir, timeout),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0), grace_period=5):
            if time.monotonic() >= deadline:
                alive = [rank for rank, process in enumerate(ctx.processes) if process.is_alive()]
                for process in ctx.processes:
                    process.kill()
                    process.join()
                raise AssertionError(f"{fn.__name__} did not finish within {timeout} s (ranks {alive} still running)")
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        # The first rank to exit may only be a victim (its peer hung up mid-collective), so report them all.
        reports = []
        for rank, (process, error_file) in enumerate(zip(ctx.processes, ctx.error_files)):
            if os.access(error_file, os.R_OK):
                with open(error_file, "rb") as f:
                    reports.append(f"--- rank {rank} raised:\n{pickle.load(f)}")
            elif process.exitcode != 0:
                reports.append(f"--- rank {rank} exited with code {process.exitcode}")
        return "\n".join(reports)
    return None


def _run_on_ranks(fn, *args, world_size=2, timeout=120):
    """Run fn(rank, world_size, *args) on world_size spawned processes in one gloo group; return the
    per-rank results in rank order. fn must be a module-level function; args and results are pickled;
    the ranks inherit the test's environment (monkeypatched variables included). Any rank's exception (or a timeout) fails the test with every failed rank's traceback, and every
    rank is killed, so a rank left waiting in a collective never hangs the run."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as out_dir:
        for attempt in range(2):
            failure = _spawn(fn, args, world_size, timeout, out_dir)
            if failure is None:
                break
            # free_port only says the port was free a moment ago; another process may have taken it since.
            if attempt == 0 and "address already in use" in failure.lower():
                continue
            raise AssertionError(f"{fn.__name__} failed on {world_size} gloo ranks:\n{failure}")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


@pytest.fixture
def run_on_ranks():
    """run(fn, *args, world_size=2, timeout=120) -> [fn's result on rank 0, rank 1, ...]; see _run_on_ranks."""
    return _run_on_ranks
