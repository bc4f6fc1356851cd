"""
A nanochat model as a Hugging Face folder that `transformers` loads: weights in safetensors, the model code
(nanochat/data/hf/modeling_nanochat.py, copied beside them), config.json, and a tokenizer.json whose ids are
our tokenizer's, with a chat template that renders conversations as render_conversation does.

    from nanochat.hf_export import export_folder
    export_folder(model, tokenizer, "out/d20-sft")      # then AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)

Needs the `export` extra (transformers, safetensors): `uv sync --extra export`. Run it on a checkpoint with
`python -m scripts.export_hf -i sft --out DIR`.
"""

import json
import logging
import os
import shutil
import tempfile

import torch

from nanochat.common import UserError
from nanochat.gpt import QK_SCALE, ROPE_BASE, SMEAR_CHANNELS, VE_GATE_CHANNELS, VE_GATE_RANGE
from nanochat.lm_loss import SOFTCAP
from nanochat.tokenizer import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf", "modeling_nanochat.py")
MODEL_TYPE = "nanochat_gpt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Jinja for transformers' apply_chat_template, giving the ids of Tokenizer.render_conversation: BOS, then
# user turns between <|user_start|>/<|user_end|>, assistant turns between <|assistant_start|>/<|assistant_end|>,
# a leading system message folded into the first user turn with a blank line, and assistant content given as
# parts (text, python tool call, python output) wrapped in their own special tokens. Special tokens split the
# text before BPE, so each piece is encoded on its own, as render_conversation encodes it.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(prefix='') -%}"
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] == 'system' -%}"
    "{%- set ns.prefix = message['content'] + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.prefix + message['content'] + '<|user_end|>' -}}"
    "{%- set ns.prefix = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- else -%}{{- raise_exception('roles are system (first only), user and assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


class ExportExtraMissingError(UserError, ImportError):
    """transformers / safetensors / tokenizers are not installed."""


def require_export_extra():
    """Import check with the fix in the message: the export needs the optional `export` extra."""
    try:
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ExportExtraMissingError(f"the Hugging Face export needs the `export` extra ({e.name} is missing): "
                                      "run `uv sync --extra export`") from None


# -----------------------------------------------------------------------------
# Tokenizer


def bytes_to_unicode():
    """The byte-level BPE alphabet: each byte as one printable character (printable Latin-1 bytes stand for
    themselves, the rest take code points from 256 up), so that token strings in tokenizer.json are text."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe_parts(ranks, token, max_rank):
    """The pieces BPE makes of `token` using only merges ranked below `max_rank` (lowest rank first, leftmost
    on ties, as tiktoken merges). For a vocabulary token of rank r with max_rank=r: the two it was merged from."""
    parts = [bytes([b]) for b in token]
    while True:
        best, at = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]


def build_hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` with our ids: byte-level BPE with the merges recovered from the tiktoken ranks,
    our split regex, the special tokens, and BOS prepended on encode (as our evaluations and chat rendering do)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    # tiktoken keeps the ranks and the split regex only as these attributes; our Encoding is built from exactly them.
    ranks = tokenizer.enc._mergeable_ranks  # {token bytes: id}
    char = bytes_to_unicode()

    def text(token):
        return "".join(char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (id {rank}) is not the merge of two lower-ranked tokens; not a BPE vocabulary")
        merges.append((text(parts[0]), text(parts[1])))
    special = {name: tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    vocab.update(special)  # added tokens whose text is in the vocab keep that id
    # ignore_merges: a pre-token that is itself a vocabulary entry becomes that one token, as in tiktoken.
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    bos = tokenizer.get_bos_token_id()
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)])
    for name, token_id in special.items():
        if hf.token_to_id(name) != token_id:
            raise RuntimeError(f"special token {name} got id {hf.token_to_id(name)} in tokenizer.json, ours is {token_id}")
    return hf


def build_pretrained_tokenizer(tokenizer, max_length):
    """The transformers tokenizer saved in the folder: tokenizer.json plus BOS/EOS names and the chat template.
    EOS is <|assistant_end|>, where a chat reply ends; padding reuses it (lm-eval and generate need a pad id).
    max_length: the model's context, which lm-eval and pipelines read from the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=build_hf_tokenizer(tokenizer), bos_token="<|bos|>",
                                 eos_token="<|assistant_end|>", pad_token="<|assistant_end|>",
                                 additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|bos|>", "<|assistant_end|>")],
                                 clean_up_tokenization_spaces=False, model_max_length=max_length)
    hf.chat_template = CHAT_TEMPLATE
    return hf


# -----------------------------------------------------------------------------
# Model


def hf_config(model, tokenizer, dtype):
    """config.json: our GPTConfig under the names the modeling file reads, plus what transformers needs."""
    cfg = model.config
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    return {
        "architectures": ["NanochatForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_nanochat.NanochatConfig",
                     "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"},
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": model.padded_vocab_size,
        "sequence_len": cfg.sequence_len,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "n_embd": cfg.n_embd,
        "window_pattern": cfg.window_pattern,
        "attention_windows": [left for left, _ in model.window_sizes],
        "rope_base": float(ROPE_BASE), "qk_scale": QK_SCALE, "logit_softcap": SOFTCAP,
        "ve_gate_channels": VE_GATE_CHANNELS, "ve_gate_range": VE_GATE_RANGE, "smear_channels": SMEAR_CHANNELS,
        "bos_token_id": bos, "eos_token_id": end, "pad_token_id": end,
        "tie_word_embeddings": False, "use_cache": False,
        "dtype": dtype,
    }


def generation_config(tokenizer):
    """generation_config.json: stop where our Engine stops (<|assistant_end|> or <|bos|>); the model has no KV cache."""
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()
    return {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": end, "use_cache": False}


def export_state_dict(model, dtype):
    """Our parameters (not the rotary buffers) under their own names, contiguous, in `dtype`."""
    state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
    return {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}


def export_folder(model, tokenizer, out_dir, dtype="float32", meta=None):
    """Write the Hugging Face folder `out_dir` (replacing one that is there) and return its path.

    Everything is written into a temporary folder beside it first and moved into place at the end, so an
    interrupted export never leaves a half-written folder. meta: a small dict kept in config.json under
    "nanochat" (e.g. the checkpoint it came from).
    """
    require_export_extra()
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a folder; pass another --out")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.")
    try:
        config = hf_config(model, tokenizer, dtype)
        if meta:
            config["nanochat"] = meta
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation_config(tokenizer), f, indent=2)
        save_file(export_state_dict(model, dtype), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(MODELING_FILE, os.path.join(tmp, "modeling_nanochat.py"))
        build_pretrained_tokenizer(tokenizer, model.config.sequence_len).save_pretrained(tmp)
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.old.")
            os.replace(out_dir, os.path.join(old, "x"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote the Hugging Face folder %s", out_dir)
    return out_dir


def push_to_hub(folder, repo_id):
    """Upload the exported folder to the Hugging Face hub repo `repo_id` (created if needed; needs a login)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    logger.info("Pushed %s to https://huggingface.co/%s", folder, repo_id)
