"""
nanochat's GPT for Hugging Face transformers: a self-contained copy of the model math (only torch and
transformers), written next to the weights by `python -m scripts.export_hf`.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=32, do_sample=False)

The architecture: RoPE (half-split, rotating by -θ) then QK-norm scaled by 1.2, GQA, sliding windows per
layer, value embeddings gated per kv-head on alternate layers, ReLU² MLP, parameter-free RMSNorm, a smear of
the previous token's embedding, per-layer residual and x0 lambdas, a backout of the middle layer's output,
untied head, logits soft-capped at 15. There is no KV cache: each generated token recomputes the sequence,
which small models afford. Parameter names are those of nanochat's own checkpoints.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class NanochatConfig(PretrainedConfig):
    model_type = "nanochat_gpt"  # not transformers' built-in "nanochat", which is an older architecture

    def __init__(self, vocab_size=32768, padded_vocab_size=32768, sequence_len=2048, n_layer=12, n_head=6,
                 n_kv_head=6, n_embd=768, attention_windows=None, rope_base=100_000.0, qk_scale=1.2,
                 logit_softcap=15.0, ve_gate_channels=12, ve_gate_range=3.0, smear_channels=24, **kwargs):
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size
        self.sequence_len, self.max_position_embeddings = sequence_len, sequence_len
        self.n_layer, self.n_head, self.n_kv_head, self.n_embd = n_layer, n_head, n_kv_head, n_embd
        self.num_hidden_layers, self.num_attention_heads, self.hidden_size = n_layer, n_head, n_embd
        # Left window per layer: query i sees keys i - w .. i (w >= sequence_len: the whole context).
        self.attention_windows = list(attention_windows or [sequence_len] * n_layer)
        self.rope_base, self.qk_scale, self.logit_softcap = rope_base, qk_scale, logit_softcap
        self.ve_gate_channels, self.ve_gate_range, self.smear_channels = ve_gate_channels, ve_gate_range, smear_channels
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no weight; eps = the dtype's machine epsilon


def has_ve(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2  # alternate layers, always the last


def rotate(x, cos, sin):
    """(B, T, H, D) rotated by position, half-split layout, by -θ (the convention the weights were trained with)."""
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.window = config.attention_windows[layer_idx]
        self.qk_scale, self.gate_channels, self.gate_range = config.qk_scale, config.ve_gate_channels, config.ve_gate_range
        d, kv_dim = config.n_embd, config.n_kv_head * self.head_dim
        self.c_q = nn.Linear(d, config.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(d, kv_dim, bias=False)
        self.c_v = nn.Linear(d, kv_dim, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ve_gate = nn.Linear(config.ve_gate_channels, config.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, allowed):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.gate_range * torch.sigmoid(self.ve_gate(x[..., :self.gate_channels]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale  # QK-norm after the rotation
        # Keys within the window on the left, never on the right; allowed: (B, 1, T, T) causal + padding mask.
        idx = torch.arange(T, device=x.device)
        mask = allowed & (idx[:, None] - idx[None, :] <= self.window)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=self.n_head != self.n_kv_head)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU²


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, allowed):
        x = x + self.attn(norm(x), ve, cos, sin, allowed)
        return x + self.mlp(norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    base_model_prefix = "nanochat"  # no weight name starts with it: transformers strips no prefix
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        L, d, V = config.n_layer, config.n_embd, config.padded_vocab_size
        kv_dim = config.n_kv_head * (d // config.n_head)
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, d),
                                              h=nn.ModuleList([Block(config, i) for i in range(L)])))
        self.lm_head = nn.Linear(d, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(L) if has_ve(i, L)})
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the exported checkpoint

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def _rotary(self, positions, dtype):
        """cos, sin of shape (B, T, 1, D/2) for integer positions (B, T): fp32 angles, then the compute dtype."""
        head_dim = self.config.n_embd // self.config.n_head
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
        inv_freq = 1.0 / self.config.rope_base ** exponents
        freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
        return freqs.cos().to(dtype)[:, :, None, :], freqs.sin().to(dtype)[:, :, None, :]

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kwargs):
        """input_ids (B, T); attention_mask (B, T), 1 = token, 0 = padding (left or right). Returns fp32 logits."""
        B, T = input_ids.shape
        device, dtype = input_ids.device, self.transformer.wte.weight.dtype
        real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            position_ids = (real.long().cumsum(-1) - 1).clamp_min(0)  # left padding: the first real token is at 0
        cos, sin = self._rotary(position_ids, dtype)
        idx = torch.arange(T, device=device)
        causal = idx[None, :] <= idx[:, None]  # (T, T)
        # A padding query attends to itself so its (unused) row has no empty softmax.
        allowed = (causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
        allowed = allowed[:, None]  # (B, 1, T, T)

        x = norm(self.transformer.wte(input_ids))  # (B, T, d)
        if T > 1:  # smear: each token mixes in the previous (real) token's normalised embedding
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :self.config.smear_channels]))  # (B, T-1, 1)
            gate = gate * real[:, :-1, None]
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, middle = x, self.config.n_layer // 2
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, allowed)
            if i == middle:
                x_backout = x
        x = norm(x - self.backout_lambda * x_backout)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)  # (B, T, vocab_size)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here; -100 = ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
