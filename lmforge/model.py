"""The lmforge transformer: a Llama-family decoder, read top to bottom.

    token ids -> embed_tokens -> [ x = x + attn(norm(x)); x = x + mlp(norm(x)) ] x L -> norm -> lm_head

Pieces: RMSNorm (Zhang & Sennrich 2019), rotary positions (Su et al. 2021, in the "rotate half"
layout Hugging Face Llama uses), grouped-query attention (Ainslie et al. 2023) through
PyTorch's fused `scaled_dot_product_attention`, and a SwiGLU MLP (Shazeer 2020).

The same file runs the open-weights models of the Llama family (lmforge/hf.py imports them):
Mistral is Llama with sliding-window attention (Jiang et al. 2023), Qwen2 adds biases to the
q/k/v projections, Qwen3 normalises each query and key head before the rotation (QK-norm), and
Llama 3 rescales the rotary frequencies for long contexts. Each is one config field, used in
one place. GPT-2 differs in most pieces and has its own file (gpt2.py).

Parameter names follow Hugging Face `LlamaForCausalLM` exactly
(`model.layers.{i}.self_attn.q_proj.weight`, ...), so export and import are a key-for-key copy,
and the config fields carry the same names as Hugging Face's `LlamaConfig`.

The model is pure: no parallelism, checkpointing, compile or hooks inside. Those are applied
from outside (see train.py).

Shape legend: B batch, T new tokens, S cached + new tokens, D hidden_size, H query heads,
K key/value heads, Hd head_dim, V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.ops import lm_head_output, rotary

ROPE_TYPES = ("default", "linear", "llama3")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 704
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    # What Hugging Face architecture a checkpoint came from (or exports to); the fields below
    # are set by the importer and stay at their defaults for models trained here.
    model_type: str = "llama"
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen3 sets its own)
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets this and o_proj_bias
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each query/key head before the rotation
    sliding_window: int | None = None  # Mistral: a token sees at most this many (itself included)
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, max_seq_len: int, *, head_dim: int = 64,
                   kv_group: int = 1, aspect_ratio: int = 64, **overrides) -> ModelConfig:
        """Size preset from one dial, as nanochat does: width = depth * aspect_ratio.

        Heads are hidden_size / head_dim; with kv_group g, every g query heads share one K/V head.
        The SwiGLU hidden size is 8/3 of the width (same parameter count as a 4x GELU MLP),
        rounded up to a multiple of 32.
        """
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise LmforgeError(f"model config: unknown fields {sorted(unknown)}")
        hidden = depth * aspect_ratio
        heads = max(1, hidden // head_dim)
        if heads % kv_group:
            raise LmforgeError(f"kv_group={kv_group} must divide the {heads} attention heads (width / head_dim)")
        intermediate = 32 * math.ceil(hidden * 8 / 3 / 32)
        config = cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=depth,
                     num_attention_heads=heads, num_key_value_heads=max(1, heads // kv_group),
                     intermediate_size=intermediate, max_position_embeddings=max_seq_len)
        for key, value in overrides.items():
            setattr(config, key, value)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise LmforgeError naming the field when the shapes cannot work."""
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise LmforgeError(f"model config: {f}={getattr(self, f)!r} must be a positive integer")
        if self.model_type not in MODEL_TYPES:
            raise LmforgeError(f"model config: model_type={self.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        if self.head_dim is None:  # the usual case: heads split the width
            if self.hidden_size % self.num_attention_heads:
                raise LmforgeError(f"model config: num_attention_heads={self.num_attention_heads} does not divide "
                                   f"hidden_size={self.hidden_size}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise LmforgeError(f"model config: head_dim={self.head_dim!r} must be a positive integer")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise LmforgeError(f"model config: sliding_window={self.sliding_window!r} must be a positive integer "
                               "or null")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise LmforgeError(f"model config: rope_scaling type {rope_type!r} is not supported (supported: "
                               f"{', '.join(ROPE_TYPES)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LmforgeError(f"model config: num_key_value_heads={self.num_key_value_heads} does not divide "
                               f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise LmforgeError(f"model config: head_dim={self.head_dim} must be even for rotary positions")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.head_dim is not None and self.head_dim * self.num_attention_heads == self.hidden_size:
            del d["head_dim"]  # implied; leaving it out keeps "heads must divide the width" checkable
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LmforgeError(f"model config: unknown fields {sorted(unknown)}")
        config = cls(**d)
        config.validate()
        return config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Hugging Face Llama: bf16 squares lose too many bits.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float,
                  scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the angle p * theta^(-2i/Hd) for position p and pair i: (max_len, Hd/2) each."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":  # positions interpolated: p / factor (Chen et al. 2023)
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: slow frequencies (wavelength beyond the original context / low_freq_factor) are
        # divided by factor, fast ones (below context / high_freq_factor) kept, and those between
        # blended linearly in context / wavelength (Meta's reference `apply_scaling`).
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        ratio = context * inv_freq / (2 * math.pi)  # context / wavelength
        smooth = ((ratio - low) / (high - low)).clamp(0, 1)  # 0: slow, 1: fast
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (max_len, Hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+Hd/2}) by position-dependent angles ("rotate half" layout, as Hugging
    Face Llama). x: (B, H, T, Hd); cos/sin: (T, Hd/2); the result in x's dtype or `dtype`. One fused
    autograd op, see ops.rotary."""
    return rotary(x, cos, sin, dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = 0,
                     window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention of T new queries at positions start .. start+T-1 over keys at 0 .. S-1.

    q (B, H, T, Hd); k, v (B, K, S, Hd) with S = start + T; grouped-query heads when K < H.
    With a sliding `window`, a query at position p sees keys p - window < j <= p (Mistral).
    """
    T, S = q.size(2), k.size(2)
    gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
    if window is not None and S > window:
        pos = torch.arange(start, start + T, device=q.device).unsqueeze(1)  # (T, 1)
        key_pos = torch.arange(S, device=q.device)  # (S,)
        mask = (key_pos <= pos) & (key_pos > pos - window)  # (T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    if start == 0:  # plain causal attention over the T new tokens (training, or a first prefill)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    if T == 1:  # one new token attends to everything cached: no mask needed
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **gqa)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)  # token i sees 0 .. start+i
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


class KVCache:
    """Preallocated keys and values for every layer: (L, B, K, max_len, Hd) each, one contiguous
    sequence per batch row, all rows at the same position (plain generation; generate.py).

    A cache is what a model's forward pass hands each attention layer. Its face, shared with the
    inference engine's paged cache (engine/model_runner.py), is three calls: `positions(T)` for
    the T new tokens, `attend(layer, q, k, v, ...)` to store this step's keys/values and attend
    over everything cached, and `advance(T)` once every layer has run.
    """

    def __init__(self, config, batch_size: int, max_len: int, device, dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len
        self.context = config.max_position_embeddings

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Positions of the next num_tokens tokens: (T,) int64."""
        if self.pos + num_tokens > self.context:
            raise LmforgeError(f"sequence of {self.pos + num_tokens} tokens exceeds the model's context of "
                               f"{self.context}; shorten the prompt or --max-tokens")
        assert self.pos + num_tokens <= self.max_len, "KV cache too small"
        return torch.arange(self.pos, self.pos + num_tokens, device=self.k.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None, scale: float | None = None) -> torch.Tensor:
        """Store this step's (B, K, T, Hd) keys/values, attend q (B, H, T, Hd) over all S so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return causal_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], self.pos, window, scale)

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        d = config.hidden_size
        self.sliding_window = config.sliding_window
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, H*Hd), k and v (B, T, K*Hd). (engine/fuse.py swaps in one matmul for the three.)"""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, H, Hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, Hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, Hd)
        if hasattr(self, "q_norm"):  # Qwen3's QK-norm, per head, before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        # Without a cache on CPU (training, scoring), the rotation and attention run in fp32 even under
        # bf16 autocast: PyTorch's CPU kernels there are faster in fp32 (the rotation 3x, flash
        # attention's backward 1.2x on a 2-core EPYC) and the scores come out more precise.
        fp32 = kv_cache is None and x.device.type == "cpu" and q.dtype != torch.float32
        dtype = torch.float32 if fp32 else None
        q = apply_rotary(q.transpose(1, 2), cos, sin, dtype)  # (B, H, T, Hd)
        k = apply_rotary(k.transpose(1, 2), cos, sin, dtype)  # (B, K, T, Hd)

        if kv_cache is not None:
            y = kv_cache.attend(self.layer_idx, q, k, v, window=self.sliding_window)
        elif fp32:
            with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs back to bf16
                y = causal_attention(q, k, v.float(), window=self.sliding_window).to(x.dtype)
        else:
            y = causal_attention(q, k, v, window=self.sliding_window)  # (B, H, T, Hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*Hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        # `model.` prefix and `lm_head` outside it: Hugging Face's LlamaForCausalLM layout.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_buffers()

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers, under one name for every model file (checkpointing, hooks)."""
        return self.model.layers

    def init_buffers(self) -> None:
        """Tie the head and compute the rotary tables: what the state dict does not carry. The
        loader builds the model on the meta device, assigns the loaded tensors, then calls this."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        c = self.config
        device = self.model.embed_tokens.weight.device
        with torch.device("cpu"):  # on the meta device these few numbers would pull in its whole op library
            cos, sin = rotary_tables(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
        if device.type != "meta":
            cos, sin = cos.to(device), sin.to(device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_len, Hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 style: N(0, 0.02), with the two projections that write into the residual stream
        scaled by 1/sqrt(2L) so its variance stays flat with depth (Radford et al. 2019)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        for name, p in self.named_parameters():
            if p.ndim == 1:  # norm gains start at 1, biases at 0
                p.fill_(0.0 if name.endswith(".bias") else 1.0)
                continue
            s = std / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(("o_proj.weight",
                                                                                    "down_proj.weight")) else std
            p.copy_(torch.randn(p.shape, generator=generator) * s)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean",
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T). Returns logits (B, T, V), or with targets (B, T) the cross-entropy
        (targets < 0 are ignored; loss_reduction='none' gives (B, T) per-token losses in nats).
        logits_at (n,) keeps only those positions' logits: (B, n, V)."""
        return lm_head_output(self.hidden_states(input_ids, kv_cache), self.lm_head, targets, loss_reduction,
                              logits_at)

    def hidden_states(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The residual stream after the final norm: (B, T, D) (what the head reads; embeddings)."""
        B, T = input_ids.shape
        if kv_cache is not None:
            positions = kv_cache.positions(T)  # (T,): where the new tokens sit in their sequences
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, Hd/2) each
        elif T > self.config.max_position_embeddings:
            raise LmforgeError(f"sequence of {T} tokens exceeds the model's context of "
                               f"{self.config.max_position_embeddings}; shorten it or train a longer context")
        else:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.model.norm(x)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), Kaplan et al. 2020 / PaLM App. B:
        6 per matmul weight (the embedding lookup is not a matmul, the head is) plus attention's
        QK^T and AV, 12 * L * H * Hd * T (counting the full T x T square, as PaLM does)."""
        c = self.config
        matmul_params = sum(p.numel() for p in self.model.layers.parameters() if p.ndim == 2)
        matmul_params += self.lm_head.weight.numel()  # tied or not, the head is a matmul
        return 6 * matmul_params + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
