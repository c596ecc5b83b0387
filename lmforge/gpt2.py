"""GPT-2 (Radford et al. 2019), read top to bottom, for importing its open-weights checkpoints.

    token ids -> wte + wpe -> [ x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) ] x L -> ln_f -> lm_head

It differs from the Llama family of model.py in most pieces, so it has its own file: learned
absolute positions instead of rotary, LayerNorm with a bias instead of RMSNorm, a 4x GELU MLP
instead of SwiGLU, biases on every projection, and one fused q/k/v projection. The pre-LN
placement (a norm at the input of each sub-block, one more after the last) is GPT-2's change to
GPT-1 (paper, section 2.3).

Parameter names and layouts are Hugging Face's `GPT2LMHeadModel` exactly
(`transformer.h.{i}.attn.c_attn.weight`, ...), so import is a key-for-key copy, and the config
fields are those of Hugging Face's `GPT2Config`. The projections are OpenAI's "Conv1D": a linear
layer whose weight is stored (in, out), the transpose of nn.Linear's. It is kept that way and
applied as x @ W + b, so no tensor is transposed on the way in or out.

The forward pass, the KV cache and the loss follow model.py's `Transformer`, so generation and
evaluation run either model unchanged. There is no dropout (Hugging Face's configs carry 0.1 for
pre-training; lmforge trains and runs without it).

Shape legend: B batch, T new tokens, S cached + new tokens, D n_embd, H n_head, Hd head_dim,
V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.model import KVCache, causal_attention
from lmforge.ops import lm_head_output

# Hugging Face's activation_function names. "gelu_new" (GPT-2's own) and its aliases are GELU's
# tanh approximation (Hendrycks & Gimpel 2016), which PyTorch computes in one kernel; "gelu" is exact.
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class GPT2Config:
    # Defaults are Hugging Face's GPT2Config (GPT-2 small), so a sparse config.json means what it means there.
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True  # scores * 1/sqrt(head_dim); False: unscaled
    scale_attn_by_inverse_layer_idx: bool = False  # scores further / (layer index + 1) (Mistral-GPT2 runs)
    # Options lmforge cannot run, kept as fields so a checkpoint that sets them is refused, not misread.
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False

    model_type = "gpt2"  # a class constant, not a field; to_dict writes it for the loader's dispatch

    # The names the rest of lmforge (KVCache, generate, evaluate) reads from a model config.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head  # plain multi-head attention

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    def validate(self) -> None:
        """Raise LmforgeError naming the field when the model cannot be built or run as configured."""
        for f in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise LmforgeError(f"gpt2 config: {f}={getattr(self, f)!r} must be a positive integer")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise LmforgeError(f"gpt2 config: n_inner={self.n_inner!r} must be a positive integer or null "
                               "(null: 4 * n_embd)")
        if self.n_embd % self.n_head:
            raise LmforgeError(f"gpt2 config: n_head={self.n_head} does not divide n_embd={self.n_embd}")
        if self.activation_function not in ACTIVATIONS:
            raise LmforgeError(f"gpt2 config: activation_function={self.activation_function!r} is not supported "
                               f"(supported: {', '.join(ACTIVATIONS)})")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
            raise LmforgeError(f"gpt2 config: layer_norm_epsilon={self.layer_norm_epsilon!r} must be a positive "
                               "number")
        if self.reorder_and_upcast_attn:
            raise LmforgeError("gpt2 config: reorder_and_upcast_attn=true (attention scores in fp32 under "
                               "mixed precision) is not supported; lmforge computes attention with PyTorch's "
                               "scaled_dot_product_attention in the compute dtype. Set it to false to run the "
                               "model anyway: in fp32 the result is the same")
        if self.add_cross_attention:
            raise LmforgeError("gpt2 config: add_cross_attention=true (GPT-2 as an encoder-decoder's decoder) "
                               "is not supported; lmforge runs decoder-only language models")

    def to_dict(self) -> dict:
        """Hugging Face GPT2Config fields plus model_type: the config.json both libraries read."""
        return {"model_type": self.model_type, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Config:
        """From a config.json, lmforge's or Hugging Face's: keys this model does not use (dropouts,
        initializer_range, the summary_* heads of GPT2DoubleHeadsModel, token ids, ...) are ignored;
        values it cannot honour raise LmforgeError."""
        if d.get("model_type", cls.model_type) != cls.model_type:
            raise LmforgeError(f"gpt2 config: model_type={d['model_type']!r}, expected 'gpt2'")
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in known})
        config.validate()
        return config


class Conv1D(nn.Module):
    """A linear layer with the weight stored (in, out), as OpenAI's GPT-2 code (and Hugging Face's
    `Conv1D`) keep it; the name is historical, there is no convolution."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) * 0.02)  # HF Conv1D's default
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)  # (B*T, out) = x @ W + b
        return y.view(*x.shape[:-1], y.size(-1))


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim = layer_idx, config.n_head, config.head_dim
        d = config.n_embd
        self.c_attn = Conv1D(d, 3 * d)  # q, k, v side by side along the output
        self.c_proj = Conv1D(d, d)
        self.scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)  # (B, T, D) each
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Hd)

        if kv_cache is None:
            y = causal_attention(q, k, v, scale=self.scale)  # (B, H, T, Hd)
        else:
            y = kv_cache.attend(self.layer_idx, q, k, v, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, H*Hd)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.intermediate_size)
        self.c_proj = Conv1D(config.intermediate_size, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        config.validate()
        self.config = config
        # `transformer.` prefix and `lm_head` outside it: Hugging Face's GPT2LMHeadModel layout.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_buffers()

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, under the name every model file shares (checkpointing, hooks)."""
        return self.transformer.h

    def init_buffers(self) -> None:
        """Tie the head to the token embedding: the one thing the state dict does not carry (the name
        matches Transformer's, which the loader calls after assigning the loaded tensors)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation: N(0, 0.02), with the two projections that write into the residual
        stream (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2L) (paper, section 2.3); biases 0, norm gains 1."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith(".bias") else 1.0)
                continue
            s = std / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else std
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
        elif T > self.config.n_positions:
            raise LmforgeError(f"sequence of {T} tokens exceeds the model's context of "
                               f"{self.config.n_positions}; shorten it or train a longer context")
        else:
            positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (B, T, D)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once); exclude_embedding drops the token and position
        tables, lookups rather than matmuls (Kaplan et al. 2020 count N without both)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, as Transformer.flops_per_token: 6 per matmul weight (the head
        included, the embedding lookups not) plus attention's 12 * L * H * Hd * T."""
        c = self.config
        matmul_params = sum(p.numel() for p in self.transformer.h.parameters() if p.ndim == 2)
        matmul_params += self.lm_head.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * seq_len
