"""
The GPT: a decoder-only Transformer, all the math and nothing else. RoPE with QK-norm, ReLU² MLP, RMSNorm
without parameters or biases, untied embedding / lm_head, GQA, sliding windows ("SSSL"), value embeddings on
every other layer, a "smear" of the previous token's embedding, residual and x0 lambdas, a "backout" of the
middle layer before the head, logits soft-capped at 15. Precision is explicit (no autocast): fp32 master
weights (embeddings in the compute dtype), each Linear casting its weight to the activations' dtype.

    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=12, n_head=6, n_kv_head=6, n_embd=768))
    model.to_empty(device="cuda")
    model.init_weights()
    loss = model(idx, targets)               # idx, targets: (B, T) int64; targets -1 = ignored
    logits = model(idx)                      # (B, T, vocab_size) fp32, soft-capped
    h = model.hidden_states(idx)             # (B, T, n_embd): forward without the head
    scored = model.logits(h[rows, cols])     # (N, vocab_size): the head on chosen positions only

Tests: python -m pytest tests/test_gpt.py -q
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.flash_attention import flash_attn
from nanochat.lm_loss import lm_loss, softcap

log = logging.getLogger("nanochat.gpt")

ROPE_BASE = 100_000  # raised from 10K on 2026-03-09
ROTARY_LEN_MULT = 10  # rotary tables cover 10x the training context (longer prompts at inference)
QK_SCALE = 1.2  # post-norm q/k scale (autoresearch): an extra 1.44 on the attention logits
VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels of the attention input
VE_GATE_RANGE = 3.0  # gate = 3·sigmoid(.), range (0, 3), starts near 1.5
SMEAR_CHANNELS = 24  # smear gate reads the first 24 channels of the current token's embedding


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


# -----------------------------------------------------------------------------
# Small pieces


def norm(x):
    """Parameter-free RMSNorm over the last dim (eps = PyTorch default, fp32 machine epsilon)."""
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, always including the last one: ceil(L/2) layers."""
    return layer_idx % 2 == (n_layer - 1) % 2


def padded_vocab_size(vocab_size, multiple=64):
    """Round the vocab up so embedding rows shard evenly across ranks and matmuls tile nicely."""
    return -(-vocab_size // multiple) * multiple


def window_sizes_for(config):
    """(left, right) attention window per layer in FA3 convention, from the tiled S/L pattern."""
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window_pattern must be a non-empty string of S and L, got {config.window_pattern!r}")
    long_window = config.sequence_len
    short_window = -(-config.sequence_len // 4 // 128) * 128  # a quarter, rounded UP to the FA3 tile: 2048 -> 512
    sizes = [(long_window if pattern[i % len(pattern)] == "L" else short_window, 0) for i in range(config.n_layer)]
    sizes[-1] = (long_window, 0)  # the final representation sees the whole context
    return sizes


def apply_rotary_emb(x, cos, sin):
    """Rotate (B, T, H, D) by position, half-split layout."""
    # By -θ (upstream's convention, which checkpoints depend on); only q's rotation relative to k matters.
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=3)


class Linear(nn.Linear):
    """nn.Linear that casts its (fp32 master) weight to the activation dtype: our replacement for autocast."""

    casts_weight = True  # forward is exactly F.linear(x, weight.to(x.dtype)): lm_loss may fuse it

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


# -----------------------------------------------------------------------------
# Blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        d, kv_dim = config.n_embd, config.n_kv_head * self.head_dim
        self.c_q = Linear(d, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(d, kv_dim, bias=False)
        self.c_v = Linear(d, kv_dim, bias=False)
        self.c_proj = Linear(d, d, bias=False)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, hd): FA3-native layout
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer-style value residual: a per-head gate in (0, 3) decides how much of the token's
            # value embedding joins its value vector.
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE  # QK-norm after RoPE
        if kv_cache is None:
            y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            pos = kv_cache.get_pos()  # host-side lengths: reading cache_seqlens would sync with the GPU every layer
            y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                                   causal=True, window_size=window_size,
                                                   cache_pos=pos if pos is not None else kv_cache.lengths)
        return self.c_proj(y.contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU²


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Build under torch.device("meta"), then `to_empty(device)` and `init_weights()`.
    compute_dtype: None = nanochat.common.get_compute_dtype(). embedding_dtype: of the embedding tables (and
    their AdamW moments); None = the compute dtype, or fp32 under fp16 (GradScaler can't unscale fp16 grads)."""

    def __init__(self, config, pad_vocab_size_to=64, compute_dtype=None, embedding_dtype=None):
        super().__init__()
        sizes = dict(sequence_len=config.sequence_len, vocab_size=config.vocab_size, n_layer=config.n_layer,
                     n_head=config.n_head, n_kv_head=config.n_kv_head, n_embd=config.n_embd)
        if min(sizes.values()) < 1:
            raise ValueError(f"every GPTConfig size must be >= 1, got {sizes}")
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(f"need n_embd % n_head == 0 and n_head % n_kv_head == 0, got n_embd={config.n_embd}, "
                             f"n_head={config.n_head}, n_kv_head={config.n_kv_head}")
        if (config.n_embd // config.n_head) % 2:
            raise ValueError(f"head dim {config.n_embd // config.n_head} must be even for RoPE")
        if config.n_embd < max(SMEAR_CHANNELS, VE_GATE_CHANNELS):
            raise ValueError(f"n_embd must be >= {SMEAR_CHANNELS} (the smear gate reads that many channels)")
        if compute_dtype is None:
            from nanochat.common import get_compute_dtype

            compute_dtype = get_compute_dtype()[0]
        self.config = config
        self.compute_dtype = compute_dtype
        if embedding_dtype is None:
            embedding_dtype = torch.float32 if compute_dtype == torch.float16 else compute_dtype
        self.embedding_dtype = embedding_dtype
        self.window_sizes = window_sizes_for(config)
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, pad_vocab_size_to)
        if self.padded_vocab_size != config.vocab_size:
            log.info("Padding vocab size from %d to %d (a multiple of %d)", config.vocab_size, self.padded_vocab_size, pad_vocab_size_to)
        L, d, V = config.n_layer, config.n_embd, self.padded_vocab_size
        head_dim = d // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, d, dtype=self.embedding_dtype),
            h=nn.ModuleList([Block(config, i) for i in range(L)]),
        ))
        self.lm_head = Linear(d, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim, dtype=self.embedding_dtype)
                                           for i in range(L) if has_ve(i, L)})
        cos, sin = self._rotary_tables(None)
        self.register_buffer("cos", cos, persistent=False)  # (1, 10T, 1, hd/2), compute dtype
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, device):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        t = torch.arange(ROTARY_LEN_MULT * self.config.sequence_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return (freqs.cos().to(self.compute_dtype)[None, :, None, :],
                freqs.sin().to(self.compute_dtype)[None, :, None, :])

    @torch.no_grad()
    def init_weights(self):
        """Fill every parameter and the rotary tables on the model's current device. The draw order below is
        part of bit-reproducibility; bf16 tables draw in fp32, then round."""
        L, d = self.config.n_layer, self.config.n_embd
        s = math.sqrt(3) / math.sqrt(d)  # Uniform(-s, s) has std 1/sqrt(d)
        _fill(self.transformer.wte.weight, lambda t: t.normal_(0.0, 0.8))
        _fill(self.lm_head.weight, lambda t: t.normal_(0.0, 0.001))  # tiny: initial loss ≈ ln(V)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                lin.weight.uniform_(-s, s)
            block.attn.c_proj.weight.zero_()  # residual branches start as identity
            block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s)
            block.mlp.c_proj.weight.zero_()
        # In Python floats, rounded to fp32 once: fp32 tensor arithmetic lands one ulp off the reference's values,
        # enough to move an fp32 run off the reference's curve (docs/performance.md).
        last = max(L - 1, 1)
        self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * i / last for i in range(L)]))  # 1.15 at layer 0 .. 1.05
        self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * i / last for i in range(L)]))  # 0.20 down to 0.05
        self.smear_lambda.fill_(0.0)  # smear starts disabled
        self.backout_lambda.fill_(0.2)
        self.smear_gate.weight.uniform_(0.0, 0.02)
        for key in sorted(self.value_embeds, key=int):
            _fill(self.value_embeds[key].weight, lambda t: t.uniform_(-s, s))
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.uniform_(0.0, 0.02)  # gates start near 3·sigmoid(0) = 1.5
        cos, sin = self._rotary_tables(self.transformer.wte.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def get_device(self):
        return self.transformer.wte.weight.device

    # -- forward ---------------------------------------------------------------

    def _smear(self, x, kv_cache):
        """Mix the previous token's normalised embedding into each position: a cheap bigram."""
        lam = self.smear_lambda.to(x.dtype)
        prev = None
        if kv_cache is not None:
            prev = kv_cache.prev_embedding
            kv_cache.prev_embedding = x[:, -1:, :]  # (B, 1, d) for the next chunk
        if prev is None:
            if x.size(1) == 1:  # the first token has nothing to its left
                return x
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))  # (B, T-1, 1)
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        # A chunk after cached tokens: its first position mixes in the last cached embedding, so
        # chunked prefill equals one big prefill (upstream skipped it for chunks longer than 1).
        left = torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1) if x.size(1) > 1 else prev.to(x.dtype)
        gate = lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # (B, T, 1)
        return x + gate * left

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx: (B, T) int64. Returns fp32 soft-capped logits (B, T, vocab_size) when targets is None,
        else the cross-entropy (scalar for 'mean'/'sum', (B*T,) for 'none'); targets == -1 are ignored."""
        x = self.hidden_states(idx, kv_cache)  # (B, T, d)
        if targets is None:
            return self.logits(x)
        B, T = idx.shape
        return lm_loss(x.view(B * T, -1), self.lm_head, targets.reshape(-1), self.config.vocab_size, loss_reduction)

    def hidden_states(self, idx, kv_cache=None):
        """idx: (B, T) int64 -> the final normalised hidden states (B, T, n_embd) in the compute dtype,
        i.e. everything forward does before the head. Advances kv_cache by T when one is given; when its rows
        hold different numbers of positions, each row's tokens take the rotary angles of its own positions."""
        B, T = idx.shape
        # The cache's get_pos() is None when its rows hold different numbers of positions (a continuous batch);
        # its `lengths` then lists them on the host.
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        end = T0 + T if T0 is not None else max(kv_cache.lengths) + T  # the host copy: no device sync
        if end > self.cos.size(1):
            raise ValueError(f"sequence too long: positions up to {end} but rotary tables cover {self.cos.size(1)} "
                             f"(10 x sequence_len={self.config.sequence_len})")
        if self.cos.dtype != self.compute_dtype or self.cos.device != idx.device:
            raise RuntimeError(f"rotary tables are {self.cos.dtype} on {self.cos.device} but the model computes in "
                               f"{self.compute_dtype} on {idx.device}: call init_weights() after moving the model")
        if T0 is not None:
            cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]  # (1, T, 1, hd/2): every row at T0
        else:
            positions = kv_cache.cache_seqlens.long().unsqueeze(1) + torch.arange(T, device=idx.device)  # (B, T)
            cos_sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, hd/2): each row at its own place
        L = self.config.n_layer

        x = norm(self.transformer.wte(idx).to(self.compute_dtype))  # (B, T, d)
        x = self._smear(x, kv_cache)
        x0 = x
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            # 0-dim fp32 lambdas don't promote a bf16 x.
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if i == L // 2:
                x_backout = x
        if kv_cache is not None:
            kv_cache.advance(T)
        # Backout: take back part of the middle layer's output, which helps the head (autoresearch).
        return norm(x - self.backout_lambda.to(x.dtype) * x_backout)

    def logits(self, x):
        """(..., n_embd) hidden states -> fp32 soft-capped logits (..., vocab_size), padded columns dropped."""
        return softcap(self.lm_head(x)[..., :self.config.vocab_size].float())

    # -- counting --------------------------------------------------------------

    def num_matmul_params(self):
        """Weights of every Linear (transformer matrices incl. ve_gate, lm_head, smear_gate)."""
        # Any nn.Linear, so Float8Linear counts too (counting only our Linear undercounts MFU ~8x with --fp8).
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def num_scaling_params(self):
        """Parameter counts per optimizer group, and their total."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                               self.smear_lambda, self.backout_lambda)),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is in no count group"
        return counts

    def _attn_context(self, ctx):
        """Keys each layer's query attends to at context length ctx (window-limited)."""
        return [ctx if w < 0 else min(w, ctx) for w, _ in self.window_sizes]

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention at full context."""
        hd = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * hd * n for n in self._attn_context(self.config.sequence_len))
        return 6 * self.num_matmul_params() + attn

    def estimate_decode_flops(self, ctx):
        """Forward FLOPs to decode one token with `ctx` tokens already cached."""
        hd = self.config.n_embd // self.config.n_head
        return 2 * self.num_matmul_params() + sum(4 * self.config.n_head * hd * n for n in self._attn_context(ctx))

    def estimate_prefill_flops(self, num_tokens):
        """Forward FLOPs to prefill `num_tokens` tokens from an empty cache (causal, windowed)."""
        hd, N = self.config.n_embd // self.config.n_head, num_tokens
        attended = sum(w * (w + 1) // 2 + (N - w) * w for w in self._attn_context(N))
        return 2 * self.num_matmul_params() * N + 4 * self.config.n_head * hd * attended

    def kv_bytes_per_token(self, dtype=None):
        """KV-cache bytes per token per batch row (all layers, keys and values)."""
        itemsize = (dtype or self.compute_dtype).itemsize
        hd = self.config.n_embd // self.config.n_head
        return self.config.n_layer * 2 * self.config.n_kv_head * hd * itemsize

    def kv_read_bytes(self, ctx, dtype=None):
        """KV-cache bytes one decode step reads per batch row at context `ctx` (window-limited)."""
        itemsize = (dtype or self.compute_dtype).itemsize
        hd = self.config.n_embd // self.config.n_head
        return sum(2 * self.config.n_kv_head * hd * itemsize * n for n in self._attn_context(ctx))

    # -- optimizer ----------------------------------------------------------------

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        """MuonAdamW with the model's param groups; their order fixes the comms order and the state_dict layout."""
        from nanochat.optim import MuonAdamW

        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        log.info("Scaling the AdamW LRs of lm_head/wte/value_embeds by (d/768)^-0.5 = %.6f", dmodel_lr_scale)

        def adamw(params, lr, betas, weight_decay):
            return dict(kind="adamw", params=list(params), lr=lr, betas=betas, eps=1e-10, weight_decay=weight_decay)

        groups = [
            adamw([self.lm_head.weight], unembedding_lr * dmodel_lr_scale, (0.8, 0.96), 0.01),
            adamw([self.transformer.wte.weight], embedding_lr * dmodel_lr_scale, (0.8, 0.995), 0.001),
            adamw(self.value_embeds.parameters(), embedding_lr * dmodel_lr_scale * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        grouped = [p for g in groups for p in g["params"]]
        assert len(grouped) == len({id(p) for p in grouped}) == len(list(self.parameters())), \
            "every parameter must be in exactly one optimizer group"
        optimizer = MuonAdamW(groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    # -- sampling -----------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive sampler, the reference for the KV-cached Engine: batch 1, full recompute every step.
        tokens: a non-empty list of ints. Yields max_tokens token ids."""
        if not tokens:
            raise ValueError("generate() needs at least one prompt token (e.g. BOS)")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, V)
            if top_k is not None and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()


def _fill(param, draw):
    """Run an in-place random init in fp32 (the draw sequence doesn't depend on storage dtype), then store."""
    if param.dtype == torch.float32:
        draw(param)
    else:
        param.copy_(draw(torch.empty_like(param, dtype=torch.float32)))
