"""scripts/tok_train.py and scripts/tok_eval.py end to end, in-process, on tiny fixture shards in tmp_path."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.tokenizer import EncodingUnavailableError, RustBPETokenizer, get_token_bytes, get_tokenizer
from scripts import tok_eval, tok_train

WORDS = ("river stone market winter garden signal copper lantern orbit meadow thunder violet harbor "
         "pencil canyon ember falcon quartz velvet wander glacier saddle timber hollow breeze").split()
VOCAB_SIZE = 256 + 9 + 40


def _documents(seed, n):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]) + f" {rng.randint(0, 999)}")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture
def sharded_base(base_dir, tmp_path, monkeypatch):
    """The kit's base dir with two train shards and one val shard (column `text`, several row groups each)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))  # empty: no reference vocabularies
    data_dir = base_dir / "base_data_climbmix"
    data_dir.mkdir(parents=True)
    for index in range(3):
        table = pa.table({"text": _documents(index, 60)})
        pq.write_table(table, data_dir / f"shard_{index:05d}.parquet", row_group_size=20)
    return base_dir


def test_tok_train_writes_tokenizer_token_bytes_and_report(sharded_base):
    tok_train.main(["--vocab-size", str(VOCAB_SIZE), "--max-chars", "100000", "--doc-cap", "400"])
    tokenizer = get_tokenizer()
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert tokenizer.decode(tokenizer.encode(tok_train.SANITY_TEXT)) == tok_train.SANITY_TEXT
    token_bytes = get_token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    assert token_bytes[-9:].tolist() == [0] * 9 and int(token_bytes[:-9].min()) == 1
    section = (sharded_base / "report" / "tokenizer-training.md").read_text()
    assert section.startswith("## Tokenizer training\n")
    for line in ("- max_chars: 100,000", "- doc_cap: 400", f"- vocab_size: {VOCAB_SIZE}", "- num_special_tokens: 9",
                 "- token_bytes_min: 1", "- train_time: "):
        assert line in section
    assert "- token_bytes_mean: " in section and "- token_bytes_std: " in section


def test_tok_train_trains_only_on_the_train_split_within_max_chars(sharded_base, monkeypatch):
    seen = []
    real_train = RustBPETokenizer.train_from_iterator.__func__

    def spy(cls, texts, vocab_size):
        docs = list(texts)
        seen.extend(docs)
        return real_train(cls, docs, vocab_size)

    monkeypatch.setattr(RustBPETokenizer, "train_from_iterator", classmethod(spy))
    tok_train.main(["--vocab-size", str(VOCAB_SIZE), "--max-chars", "2000", "--doc-cap", "50"])
    first_train_docs = _documents(0, 60)
    assert seen == [d[:50] for d in first_train_docs[:len(seen)]]
    assert sum(map(len, seen)) > 2000 and sum(map(len, seen[:-1])) <= 2000
    assert not set(seen) & {d[:50] for d in _documents(2, 60)}  # the val shard is never trained on


def test_tok_train_without_shards_says_how_to_get_them(base_dir):
    with pytest.raises(SystemExit, match="python -m nanochat.dataset -n 8"):
        tok_train.main(["--vocab-size", str(VOCAB_SIZE)])


def test_tok_train_rejects_too_small_vocab(sharded_base, capsys):
    with pytest.raises(SystemExit) as e:
        tok_train.main(["--vocab-size", "100"])
    assert e.value.code == 2 and "at least 265" in capsys.readouterr().err


@pytest.mark.parametrize("module,defaults", [
    (tok_train, {"--max-chars": 2_000_000_000, "--doc-cap": 10_000, "--vocab-size": 32_768}),
    (tok_eval, {"--offline": False, "--timeout": 10.0})])
def test_help(module, defaults, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in defaults)
    args = vars(module.build_parser().parse_args([]))
    assert {flag: args[flag[2:].replace("-", "_")] for flag in defaults} == defaults


def test_tok_eval_offline_reports_ours_and_says_baselines_are_unavailable(sharded_base, capsys):
    tok_train.main(["--vocab-size", str(VOCAB_SIZE), "--max-chars", "100000"])
    capsys.readouterr()
    ours = tok_eval.main(["--offline"])
    out = capsys.readouterr().out
    assert "GPT-2 encoding unavailable offline (" in out and "GPT-4 encoding unavailable offline (" in out
    assert list(ours) == ["news", "korean", "code", "math", "science", "climbmix-train", "climbmix-val"]
    train_text = "\n".join(_documents(0, 60)[:20])  # first row group of the first train shard
    assert ours["climbmix-train"][0] == len(train_text.encode("utf-8"))
    assert ours["climbmix-val"][0] == len("\n".join(_documents(2, 60)[:20]).encode("utf-8"))
    section = (sharded_base / "report" / "tokenizer-evaluation.md").read_text()
    assert section.startswith("## Tokenizer evaluation\n")
    assert "GPT-2 encoding unavailable offline" in section and "### Ours alone" in section
    n_bytes, n_tokens, ratio = ours["news"]
    assert f"| news | {n_bytes} | {n_tokens} | {ratio:.2f} |" in section


def test_tok_eval_compares_against_an_available_baseline(sharded_base, byte_tokenizer, capsys, monkeypatch):
    tok_train.main(["--vocab-size", str(VOCAB_SIZE), "--max-chars", "100000"])

    def fake_pretrained(cls, name, offline=False, timeout=10.0):
        if name == "gpt2":
            return byte_tokenizer  # one token per byte, so every ratio is exactly 1.00
        raise EncodingUnavailableError("test: no GPT-4 here")

    monkeypatch.setattr(RustBPETokenizer, "from_pretrained", classmethod(fake_pretrained))
    ours = tok_eval.main([])
    out = capsys.readouterr().out
    assert "Comparison with GPT-2:" in out and "GPT-4 encoding unavailable offline (test: no GPT-4 here)" in out
    section = (sharded_base / "report" / "tokenizer-evaluation.md").read_text()
    assert "### Comparison with GPT-2\n\n| Text Type | Bytes | GPT-2 Tokens | GPT-2 Ratio | Ours Tokens | Ours Ratio | Relative Diff % |" in section
    n_bytes, n_tokens, ratio = ours["code"]
    diff = (n_bytes - n_tokens) / n_bytes * 100
    assert f"| code | {n_bytes} | {n_bytes} | 1.00 | {n_tokens} | {ratio:.2f} | {diff:+.1f}% |" in section


def test_tok_eval_without_tokenizer_says_how_to_train_one(base_dir):
    with pytest.raises(SystemExit, match="python -m scripts.tok_train"):
        tok_eval.main(["--offline"])
