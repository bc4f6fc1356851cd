"""The Hugging Face export: transformers loads the folder and it computes what our model computes (fp32 logits,
greedy generation), its tokenizer gives our ids, and its chat template our render_conversation. Offline.
Needs the `export` extra (skipped without it, failing where NANOCHAT_REQUIRE_EXTRAS=1)."""

import json
import os
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import require_extra
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.engine import Engine
from nanochat.tokenizer import SPECIAL_TOKENS, compute_token_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

BATTERY = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé café naïve 日本語のテキスト 🙂🙂 Ελληνικά русский عربى",
    "def square(x):\n    return x ** 2  # comment\n\tindented\ttabs",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10 2026-12-07",
    "whitespace    runs\n\n\n   \t \r\n  trailing   ",
    "  leading spaces",
    "it's they're we'll I'VE don't",
    "",
    "!!!??? ... ---- **** @#$%^&*()",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_tiny_gpt, bpe_tokenizer, hf_offline):
    """The export folder of the tiny trained model, and it loaded back by transformers (fp32)."""
    require_extra("transformers", "export")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanochat.hf_export import export_folder

    out = export_folder(trained_tiny_gpt, bpe_tokenizer, tmp_path_factory.mktemp("hf") / "tiny")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    return out, model, tokenizer


def test_folder_holds_safetensors_config_code_and_tokenizer(exported):
    out, _, _ = exported
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "modeling_nanochat.py", "tokenizer.json", "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # no pickles
    modeling = open(os.path.join(out, "modeling_nanochat.py"), encoding="utf-8").read()
    assert "from nanochat" not in modeling and "import nanochat" not in modeling  # self-contained
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["attention_windows"] == [128, 512, 128, 512] and config["n_kv_head"] == 2


def test_logits_match_ours_in_fp32(exported, trained_tiny_gpt, bpe_tokenizer):
    _, hf_model, _ = exported
    bos = bpe_tokenizer.get_bos_token_id()
    long_text = " ".join(BATTERY) * 6
    prompts = [[bos] + bpe_tokenizer.encode(t) for t in BATTERY[:4] + [long_text]]
    assert len(prompts[-1]) > 128 + 50  # longer than the short window: the windowed layers differ from full attention
    for ids in prompts:
        ids = ids[:512]
        x = torch.tensor([ids])
        with torch.no_grad():
            ours = trained_tiny_gpt(x)
            theirs = hf_model(x).logits
        assert theirs.shape == ours.shape == (1, len(ids), 300)
        assert (ours - theirs).abs().max().item() <= 1e-4


def test_padded_batch_matches_unpadded_rows(exported, bpe_tokenizer):
    """Left padding (what generate and lm-eval use for batches) leaves every row's real positions unchanged."""
    _, hf_model, hf_tok = exported
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog."]
    hf_tok.padding_side = "left"
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        padded = hf_model(**batch).logits
        for row, text in enumerate(texts):
            alone = hf_model(torch.tensor([hf_tok(text)["input_ids"]])).logits[0]
            assert (padded[row, -alone.size(0):] - alone).abs().max().item() <= 1e-4


def test_greedy_generate_equals_our_engine(exported, trained_tiny_gpt, bpe_tokenizer):
    _, hf_model, _ = exported
    engine = Engine(trained_tiny_gpt, bpe_tokenizer)
    bos = bpe_tokenizer.get_bos_token_id()
    for text in ["The quick brown", "def square(x):"]:
        prompt = [bos] + bpe_tokenizer.encode(text)
        (ours,), _ = engine.generate_batch(prompt, max_tokens=24, temperature=0.0)
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0].tolist()
        stops = {bos, bpe_tokenizer.encode_special("<|assistant_end|>")}
        theirs = out[:next((i for i in range(len(prompt), len(out)) if out[i] in stops), len(out))]
        assert len(ours) > len(prompt) + 3  # a real continuation, not an immediate stop
        assert theirs == ours


def test_tokenizer_ids_equal_ours(exported, bpe_tokenizer):
    out, _, hf_tok = exported
    bos = bpe_tokenizer.get_bos_token_id()
    for text in BATTERY + [BATTERY[2] * 3, "a" * 200, " " * 37, "\n" * 9]:
        ours = bpe_tokenizer.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours, text
        assert hf_tok(text)["input_ids"] == [bos] + ours  # BOS first, as our evaluations and chats start
        assert hf_tok.decode(ours) == text
    for name in SPECIAL_TOKENS:
        assert hf_tok.convert_tokens_to_ids(name) == bpe_tokenizer.encode_special(name)
        assert hf_tok(name, add_special_tokens=False)["input_ids"] == [bpe_tokenizer.encode_special(name)]
    assert hf_tok.bos_token_id == bos and hf_tok.eos_token_id == bpe_tokenizer.encode_special("<|assistant_end|>")
    # The token ids cover the whole vocabulary, each exactly once.
    vocab = hf_tok.get_vocab()
    assert sorted(vocab.values()) == list(range(bpe_tokenizer.get_vocab_size()))


def test_plain_autotokenizer_loads_the_folder(exported, bpe_tokenizer):
    from transformers import AutoTokenizer

    out, _, _ = exported
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == bpe_tokenizer.encode("Hello world")


def test_chat_template_renders_like_render_conversation(exported, bpe_tokenizer):
    _, _, hf_tok = exported
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4, of course."},
        {"role": "user", "content": "And 12 * 34?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                          {"type": "python", "text": "12 * 34"},
                                          {"type": "python_output", "text": "408"},
                                          {"type": "text", "text": "It is 408."}]},
    ]
    ours, _ = bpe_tokenizer.render_conversation({"messages": messages})
    theirs = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert theirs == ours
    prompt = hf_tok.apply_chat_template(messages[:4], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt == bpe_tokenizer.render_for_completion({"messages": messages[:4] + [{"role": "assistant", "content": ""}]})


def test_export_script_writes_folder_and_report_line(base_dir, bpe_tokenizer, trained_tiny_gpt, hf_offline, tmp_path):
    require_extra("transformers", "export")
    from scripts import export_hf

    bpe_tokenizer.save(str(base_dir / "tokenizer"))
    torch.save(compute_token_bytes(bpe_tokenizer), base_dir / "tokenizer" / "token_bytes.pt")
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d4"), 7, trained_tiny_gpt.state_dict(), None,
                    {"step": 7, "model_config": asdict(trained_tiny_gpt.config)})
    out = tmp_path / "export"
    export_hf.main(["-i", "sft", "--out", str(out), "--device-type", "cpu"])
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["lm_head.weight"], trained_tiny_gpt.lm_head.weight.float())
    assert json.load(open(out / "config.json"))["nanochat"] == {"source": "sft", "model_tag": "d4", "step": 7}
    report = (base_dir / "report" / "hugging-face-export.md").read_text()
    assert str(out) in report


def test_export_script_without_a_checkpoint_is_one_line(base_dir, tmp_path):
    from scripts import export_hf

    with pytest.raises(SystemExit) as exc:
        export_hf.main(["-i", "sft", "--out", str(tmp_path / "x"), "--device-type", "cpu"])
    assert str(exc.value).startswith("export_hf: error:") and "\n" not in str(exc.value)


def test_export_without_the_extra_says_how_to_install(monkeypatch, tmp_path):
    from scripts import export_hf

    monkeypatch.setitem(sys.modules, "transformers", None)  # what a core install (no `export` extra) has
    with pytest.raises(SystemExit) as exc:
        export_hf.main(["-i", "sft", "--out", str(tmp_path / "x")])
    assert "uv sync --extra export" in str(exc.value) and "\n" not in str(exc.value)
