"""GGUF export: a model folder as the one file llama.cpp-family runtimes load (llama.cpp, Ollama,
LM Studio, ...), written the way llama.cpp's own `convert_hf_to_gguf.py` writes each family.

    model_type        GGUF arch   what changes on the way
    llama, mistral    llama       q/k rows permuted to GGML's rotary layout; llama3 scaling -> rope_freqs
    qwen2             qwen2       nothing (q/k/v biases kept)
    qwen3             qwen3       nothing (q_norm/k_norm become attn_q_norm/attn_k_norm)
    gpt2              gpt2        Conv1D weights, stored (in, out), transposed to (out, in); a tied
                                  head written out as output.weight (older runtimes require it)

Tensor names come from gguf's own table (`gguf.get_tensor_name_map`), metadata keys from
`gguf.Keys` through `GGUFWriter`'s methods, so nothing here spells a GGUF name by hand.

The rotary trap. Hugging Face Llama rotates the pairs (i, i + Hd/2) of each head ("rotate half");
GGML's `llama` arch rotates adjacent pairs (2i, 2i + 1). Meta's original checkpoints were in the
adjacent layout and HF's conversion permuted the q/k rows into rotate-half; the converter undoes
that (`LlamaModel.permute`), and so do we. Attention scores are dot products, so one row order for
both q and k gives the same model. Qwen2/3 run GGML's NEOX rotary, which *is* rotate-half: no
permutation there.

Precision: 1-D tensors (norm gains, biases, rope_freqs) and GPT-2's position table stay F32, the
converter's rule (llama.cpp's kernels for them take F32); matrices take `dtype`. "auto" keeps the
source precision, read from the token embedding (fp32 stays f32: the converter would make f16).

Tokenizer, from tokenizer.json (+ tokenizer_config.json for bos/eos, add_bos and the chat template):
- Byte-level BPE -> tokenizer.ggml.model "gpt2": symbols as in the vocab, added tokens at their ids
  (control if special, user-defined if not), merges as "a b". llama.cpp does not read the split
  regex from the file; it has one regex per named pre-tokenizer, so the name must be the one whose
  regex cuts text as ours does:
    lmforge's (GPT-4's cl100k) and Llama 3's -> "llama-bpe". llama.cpp's LLAMA3 regex is Llama 3's,
      which is cl100k's: `\\s*[\\r\\n]+` and `\\s*[\\r\\n]` match the same text (the greedy `\\s*` backs
      off to the last newline of the run either way) and the dropped possessive quantifiers change
      nothing (tokenizer.py). That pre type also sets ignore_merges (a pre-token that is a token is
      taken whole), which is exactly lmforge's encoding rule.
    Qwen2's (one digit at a time) -> "qwen2"; GPT-2's own ByteLevel regex -> "gpt-2".
  A tokenizer.json that gguf_vocab.py rebuilt from a GGUF file (llama.cpp's regexes, Unicode-pinned) gets its
  name back (`gguf_vocab.pre_tokenizer_name`), so an imported GGUF model exports again.
  Any other regex is refused: a wrong name would tokenize differently without a word of warning.
  lmforge's own tokenizer: bos/eos/pad are <|bos|>/<|eos|>/<|pad|>, add_bos is on (every training
  document starts with <|bos|>), and <|assistant_end|> is the eot token, where llama.cpp ends a turn.
- SentencePiece-style BPE (byte_fallback, "▁" for spaces: Llama 2, Mistral) -> "llama" model:
  `<0xNN>` tokens typed BYTE, the unk token UNKNOWN, and scores that make llama.cpp's SentencePiece
  merger pick merges in the file's order (score = -merge rank). The converter, given only
  tokenizer.json, writes -1000 for every token, which leaves llama.cpp no order to merge by.

Quantised export (`quant`, gguf_quants.py has the rounding): types per tensor as llama-quantize
picks them for the same type (gguf_quants.tensor_qtype): 1-D tensors stay F32; the output head,
or the token embedding when it doubles as the head, Q6_K (Q8_0 under q8_0); q4_k and q5_k are
its Q4_K_M and Q5_K_M mixes (attn_v and ffn_down Q6_K in an eighth of the layers at each end and
every third between); other matrices the named type. Rows that are not whole blocks (256 values
for K-quants, 32 for the rest) fall back as llama-quantize does (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, else F16), and a printed note says so: SmolLM2's 576-wide rows take Q5_0 under q4_k.
Calibration (default: a slice of the default corpus beside its held-out part) runs the model over
4,096 tokens with forward hooks to get each matrix's importance vector; a tied head's rounding is
weighted by the head's inputs.

Memory: tensors are read one at a time (safetensors `safe_open`), converted and written; with
calibration the model is loaded once, in fp32, for its forward passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from lmforge.base import fsync_dir, fsync_file
from lmforge.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    check_output,
    check_tensor_names,
    verify_manifest,
)
from lmforge.common import LmforgeError, print0
from lmforge.corpus import DEFAULT_CORPUS
from lmforge.gguf_quants import (
    QUANTS,
    calibration_text,
    calibration_windows,
    collect_importance,
    default_weights,
    quantize,
    tensor_qtype,
)
from lmforge.gguf_vocab import pre_tokenizer_name as rebuilt_pre_tokenizer_name
from lmforge.tokenizer import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, SPLIT_PATTERN
from lmforge.weights import read_header

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
         "qwen3": gguf.MODEL_ARCH.QWEN3, "gpt2": gguf.MODEL_ARCH.GPT2}
Q = gguf.GGMLQuantizationType
# dtype name -> (GGML type of the matrices, general.file_type)
OUT_DTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
              "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
# GGML type -> (torch dtype the data is converted to, numpy dtype handed to the writer; numpy has no bf16)
_NUMPY = {Q.F32: (torch.float32, np.float32), Q.F16: (torch.float16, np.float16), Q.BF16: (torch.bfloat16, np.int16)}
_SOURCE_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # safetensors dtype -> "auto" choice
CALIBRATION_SEQ_LEN = 512  # tokens per calibration window (llama.cpp's imatrix default context)

# Split regexes of byte-level tokenizers -> llama.cpp pre-tokenizer name (src/llama-vocab.cpp).
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {SPLIT_PATTERN: "llama-bpe", GPT4_SPLIT_PATTERN: "llama-bpe", LLAMA3_SPLIT_PATTERN: "llama-bpe",
                  QWEN2_SPLIT_PATTERN: "qwen2", GPT2_SPLIT_PATTERN: "gpt-2"}


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Hparams:
    """What the GGUF header needs from config.json, under one set of names for every family."""
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    norm_eps: float
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...}
    sliding_window: int | None = None  # written as attention.sliding_window (Mistral v0.1)
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @property
    def arch(self) -> gguf.MODEL_ARCH:
        return ARCHS[self.model_type]


def read_hparams(raw: dict, source: str = CONFIG_FILE) -> Hparams:
    """Hparams for a config.json dict: lmforge/HF Llama-family field names, or GPT2Config's."""
    model_type = raw.get("model_type", "llama")
    if model_type not in ARCHS:
        raise LmforgeError(f"{source}: model_type {model_type!r} has no GGUF export; supported: {', '.join(ARCHS)}")
    try:
        if model_type == "gpt2":
            width, heads = raw["n_embd"], raw["n_head"]
            return Hparams(model_type, raw["vocab_size"], width, raw["n_layer"], heads, heads, width // heads,
                           raw.get("n_inner") or 4 * width, raw["n_positions"], raw.get("layer_norm_epsilon", 1e-5),
                           raw.get("tie_word_embeddings", True))
        heads = raw["num_attention_heads"]
        params = dict(raw.get("rope_parameters") or {})  # transformers 5's spelling of the two below
        theta = raw.get("rope_theta", params.pop("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or params)
        if "type" in scaling:  # the oldest spelling
            scaling.setdefault("rope_type", scaling.pop("type"))
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        elif scaling["rope_type"] not in ("linear", "llama3"):
            raise LmforgeError(f"{source}: rope_scaling type {scaling['rope_type']!r} has no GGUF export here "
                               "(supported: linear, llama3)")
        elif scaling["rope_type"] == "llama3" and ARCHS[model_type] != gguf.MODEL_ARCH.LLAMA:
            # llama.cpp reads the rope_freqs tensor that carries llama3 scaling for its llama arch only.
            raise LmforgeError(f"{source}: llama3 rope scaling on a {model_type} model has no GGUF equivalent")
        return Hparams(
            model_type, raw["vocab_size"], raw["hidden_size"], raw["num_hidden_layers"], heads,
            raw.get("num_key_value_heads") or heads, raw.get("head_dim") or raw["hidden_size"] // heads,
            raw["intermediate_size"], raw["max_position_embeddings"], raw.get("rms_norm_eps", 1e-5),
            raw.get("tie_word_embeddings", True), theta, scaling,
            # HF Qwen configs carry a window they do not use unless use_sliding_window is set.
            None if raw.get("use_sliding_window") is False else raw.get("sliding_window"),
            # lmforge's config.json names these; a Hugging Face one implies them by family.
            raw.get("qkv_bias", model_type == "qwen2" or raw.get("attention_bias", False)),
            raw.get("o_proj_bias", model_type != "qwen2" and raw.get("attention_bias", False)),
            raw.get("mlp_bias", False), raw.get("qk_norm", model_type == "qwen3"))
    except KeyError as e:
        raise LmforgeError(f"{source}: field {e.args[0]!r} is missing; add it (the model's shapes need it)") from None


# ----------------------------------------------------------------------------- tensors

def source_shapes(hp: Hparams) -> dict[str, tuple[int, ...]]:
    """Every tensor the model folder must hold for `hp`, with its shape, in writing order."""
    V, D, F = hp.vocab_size, hp.hidden_size, hp.intermediate_size
    if hp.model_type == "gpt2":  # HF GPT2LMHeadModel; Conv1D weights are (in, out)
        shapes = {"transformer.wte.weight": (V, D), "transformer.wpe.weight": (hp.context_length, D)}
        for i in range(hp.num_layers):
            p = f"transformer.h.{i}."
            for name, shape in (("ln_1", (D,)), ("attn.c_attn", (D, 3 * D)), ("attn.c_proj", (D, D)),
                                ("ln_2", (D,)), ("mlp.c_fc", (D, F)), ("mlp.c_proj", (F, D))):
                shapes[p + name + ".weight"] = shape
                shapes[p + name + ".bias"] = shape[-1:]
        shapes.update({"transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)})
    else:  # HF LlamaForCausalLM names
        q, kv = hp.num_heads * hp.head_dim, hp.num_kv_heads * hp.head_dim
        shapes = {"model.embed_tokens.weight": (V, D)}
        for i in range(hp.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (D,)
            for proj, rows in (("q", q), ("k", kv), ("v", kv)):
                shapes[f"{p}self_attn.{proj}_proj.weight"] = (rows, D)
                if hp.qkv_bias:
                    shapes[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (D, q)
            if hp.o_proj_bias:
                shapes[p + "self_attn.o_proj.bias"] = (D,)
            if hp.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = shapes[p + "self_attn.k_norm.weight"] = (hp.head_dim,)
            shapes[p + "post_attention_layernorm.weight"] = (D,)
            for proj, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
                shapes[f"{p}mlp.{proj}_proj.weight"] = shape
                if hp.mlp_bias:
                    shapes[f"{p}mlp.{proj}_proj.bias"] = shape[:1]
        shapes["model.norm.weight"] = (D,)
    if not hp.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def permute_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from HF's rotate-half layout to GGML's adjacent pairs:
    within each head, row i + s * Hd/2 (s = 0, 1) moves to row 2i + s. convert_hf_to_gguf's
    LlamaModel.permute, with num_heads the heads of *this* projection (K for k_proj under GQA)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hp: Hparams) -> torch.Tensor:
    """(Hd/2,) divisors of each rotary frequency: llama.cpp applies llama3 scaling as theta_i / factor_i
    (convert_hf_to_gguf's LlamaModel.generate_extra_tensors; Meta's `apply_scaling`). The converter
    reads original_max_position_embeddings from the top of config.json, where Llama 3.1 has none,
    and falls back to 8192, which is 3.1's value; we read the rope_scaling entry itself."""
    s = hp.rope_scaling
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    context = s.get("original_max_position_embeddings", 8192)
    inv_freq = 1.0 / hp.rope_theta ** (torch.arange(0, hp.head_dim, 2, dtype=torch.float64) / hp.head_dim)
    ratio = context * inv_freq / (2 * torch.pi)  # context / wavelength
    smooth = ((ratio - low) / (high - low)).clamp(0, 1)  # 0: slow (divided by factor), 1: fast (kept)
    return (1 / ((1 - smooth) / factor + smooth)).float()


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy (row-major) order; GGUF stores it reversed
    qtype: gguf.GGMLQuantizationType
    load: Callable  # load(safe_open handle) -> torch.Tensor of `shape`
    source: str = ""  # the model parameter whose input activations weight its rounding (calibration)
    wanted: gguf.GGMLQuantizationType | None = None  # the type before a row-length fallback


def plan_tensors(hp: Hparams, header: dict[str, dict], path: Path, matrix_qtype,
                 quant: str | None = None) -> list[PlannedTensor]:
    """What to write, checked against the weights file: every tensor present with its shape. quant
    (a gguf_quants.QUANTS name) picks each matrix's type as llama-quantize does; else matrix_qtype."""
    found = {k: v["shape"] for k, v in header.items()}
    if hp.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # a stored copy of a tied head is the embedding again
    for name in [k for k in found if k.endswith((".attn.bias", ".attn.masked_bias"))]:
        found.pop(name)  # GPT-2's causal-mask buffers, not weights
    shapes = source_shapes(hp)
    check_tensor_names(path, found, shapes)

    names = gguf.get_tensor_name_map(hp.arch, hp.num_layers)
    has_output = not hp.tie_word_embeddings or hp.model_type == "gpt2"  # else token_embd is also the head

    def matrix_type(dst: str, shape) -> tuple:
        if quant is None:
            return matrix_qtype, matrix_qtype
        is_head = dst == "output.weight" or (dst == "token_embd.weight" and not has_output)
        return tensor_qtype(quant, dst, shape[-1], hp.num_layers, is_head)

    plan = []
    if (hp.rope_scaling or {}).get("rope_type") == "llama3":
        factors = llama3_rope_factors(hp)
        plan.append(PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", tuple(factors.shape),
                                  Q.F32, lambda f, t=factors: t))
    for src, shape in shapes.items():
        dst = names.get_name(src, try_suffixes=(".weight", ".bias"))
        if dst is None:  # e.g. qk_norm on a llama-arch model: llama.cpp has no place for it
            raise LmforgeError(f"{path}: tensor {src} has no place in GGUF's {gguf.MODEL_ARCH_NAMES[hp.arch]} "
                               f"architecture; llama.cpp cannot run this {hp.model_type} variant")
        transform = None
        if hp.arch == gguf.MODEL_ARCH.LLAMA and ".self_attn.q_proj." in src:
            transform = lambda t: permute_rotary(t, hp.num_heads)  # noqa: E731
        elif hp.arch == gguf.MODEL_ARCH.LLAMA and ".self_attn.k_proj." in src:
            transform = lambda t: permute_rotary(t, hp.num_kv_heads)  # noqa: E731
        elif hp.model_type == "gpt2" and src.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            transform, shape = (lambda t: t.T), shape[::-1]
        keep_f32 = len(shape) == 1 or dst.endswith("_norm.weight") or dst.startswith("position_embd.")

        def load(f, src=src, transform=transform):
            t = f.get_tensor(src)
            return transform(t) if transform else t

        qtype, wanted = (Q.F32, Q.F32) if keep_f32 else matrix_type(dst, shape)
        # token_embd doubling as the head: rounding weighted by the head's inputs, the matmul it runs in.
        source = "lm_head.weight" if dst == "token_embd.weight" and not has_output else src
        plan.append(PlannedTensor(dst, tuple(shape), qtype, load, source, wanted))
    if hp.model_type == "gpt2" and hp.tie_word_embeddings:
        # Current llama.cpp falls back to token_embd for a missing GPT-2 head; older builds and forks
        # (ik_llama.cpp) refuse the file. The converter of their time wrote the copy, and so do we.
        name, shape = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight", shapes["transformer.wte.weight"]
        qtype, wanted = matrix_type(name, shape)
        plan.append(PlannedTensor(name, shape, qtype, lambda f: f.get_tensor("transformer.wte.weight"),
                                  "lm_head.weight", wanted))
    return plan


def _to_numpy(t: torch.Tensor, qtype) -> np.ndarray:
    torch_dtype, numpy_dtype = _NUMPY[qtype]
    t = t.to(torch_dtype).contiguous()
    if qtype == Q.BF16:  # numpy has no bf16: hand over the raw 16-bit words
        t = t.view(torch.int16)
    out = t.numpy()
    assert out.dtype == numpy_dtype
    return out


# ----------------------------------------------------------------------------- tokenizer

@dataclass
class Vocab:
    """The tokenizer.ggml.* metadata."""
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str  # llama.cpp pre-tokenizer name
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType
    merges: list[str]  # "gpt2" only
    scores: list[float] | None = None  # "llama" only
    special_ids: dict[str, int] | None = None  # bos/eos/eot/unk/pad -> id
    add_bos: bool = False
    add_eos: bool | None = None
    add_space_prefix: bool | None = None  # "llama" only
    chat_template: str | list | None = None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e}); restore the file from the model's source") from None


def _steps(component: dict | None) -> list[dict]:
    """The steps of a tokenizer.json pipeline component, Sequences flattened."""
    if not component:
        return []
    nested = next((component[k] for k in ("pretokenizers", "normalizers", "decoders", "processors")
                   if component.get(k) is not None), None)
    return [s for step in nested for s in _steps(step)] if nested is not None else [component]


def _pre_tokenizer_name(spec: dict, source: Path) -> str:
    rebuilt = rebuilt_pre_tokenizer_name(spec)  # a tokenizer.json lmforge rebuilt from a GGUF file
    if rebuilt is not None:
        return rebuilt
    steps = _steps(spec.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
        raise LmforgeError(f"{source}: split regex {pattern!r} matches no llama.cpp pre-tokenizer this exporter "
                           "knows (lmforge/GPT-4, Llama 3, Qwen2, GPT-2); llama.cpp would cut text differently")
    raise LmforgeError(f"{source}: pre-tokenizer {kinds} is not one llama.cpp reproduces; byte-level BPE must be "
                       "GPT-2's ByteLevel or a regex Split followed by ByteLevel(use_regex=false)")


def _merge_strings(merges: list) -> list[str]:
    """tokenizer.json merges ("a b" strings, or [a, b] pairs since tokenizers 0.20) as GGUF's "a b".
    A space inside a pair part is written as U+0120, as gguf's SpecialVocab does."""
    if merges and isinstance(merges[0], str):
        return list(merges)
    return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf's does_token_look_special, for added tokens not flagged special.
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def _special_ids(config: dict, model_config: dict, ids: dict[str, int], model: dict, vocab_size: int,
                 is_lmforge: bool) -> dict[str, int]:
    """bos/eos/unk/pad (and eot) ids: tokenizer_config.json's names first, then lmforge's own tokens,
    then an HF config.json's ids (GPT-2 names bos/eos only there), then the BPE model's unk."""
    found = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token = config.get(f"{kind}_token")  # a string or an AddedToken dict
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            found[kind] = ids[token]
    if is_lmforge:
        for kind, name in zip(("bos", "eos", "pad"), SPECIAL_TOKENS):
            found.setdefault(kind, ids[name])
        # llama.cpp ends a chat turn at an end-of-generation token: eos, or this one.
        found["eot"] = ids["<|assistant_end|>"]
    for kind in ("bos", "eos", "pad"):
        value = model_config.get(f"{kind}_token_id")
        if isinstance(value, int) and 0 <= value < vocab_size:
            found.setdefault(kind, value)
    if model.get("unk_token") in ids:
        found.setdefault("unk", ids[model["unk_token"]])
    return found


def _sentencepiece_prefix(spec: dict, config: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text: Llama 2's Prepend("▁") normalizer, or an
    older file's Metaspace pre-tokenizer; tokenizer_config.json's add_prefix_space overrides."""
    if config.get("add_prefix_space") is not None:
        return bool(config["add_prefix_space"])
    prepends = any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in _steps(spec.get("normalizer")))
    metaspace = any(s.get("type") == "Metaspace" and (s.get("add_prefix_space") or
                                                      s.get("prepend_scheme") in ("always", "first"))
                    for s in _steps(spec.get("pre_tokenizer")))
    return prepends or metaspace


def read_vocab(path: Path, vocab_size: int, model_config: dict | None = None) -> Vocab:
    """The GGUF tokenizer for tokenizer.json `path` (tokenizer_config.json and chat_template.jinja
    beside it) and a model of `vocab_size` embedding rows: ids past the tokenizer's last become
    "[PAD{id}]", unused, as the converter writes them."""
    spec = _read_json(path)
    if spec is None:
        raise LmforgeError(f"{path}: no such file; a GGUF file carries its tokenizer, so give the model's "
                           f"{TOKENIZER_FILE} (lmforge keeps it in the model folder or the run folder)")
    folder = path.parent
    config = _read_json(folder / "tokenizer_config.json") or {}
    model = spec.get("model") or {}
    kind = model.get("type")
    steps = _steps(spec.get("pre_tokenizer")) + _steps(spec.get("decoder"))
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    if kind != "BPE" or not (byte_level or model.get("byte_fallback")):
        what = f"a {kind} tokenizer" if kind != "BPE" else "a BPE tokenizer without byte-level symbols or byte_fallback"
        raise LmforgeError(f"{path}: {what} has no GGUF export here; supported: byte-level BPE (lmforge, GPT-2, "
                           "Llama 3, Qwen) and SentencePiece-style BPE with byte_fallback (Llama 2, Mistral)")

    added = spec.get("added_tokens") or []
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in added}}
    if max(ids.values()) >= vocab_size:
        raise LmforgeError(f"{path}: token id {max(ids.values())} is outside the model's vocab_size={vocab_size} "
                           f"({CONFIG_FILE}); this tokenizer does not belong to this model")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for symbol, i in model["vocab"].items():
        tokens[i], types[i] = symbol, gguf.TokenType.NORMAL
        if not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", symbol):
            types[i] = gguf.TokenType.BYTE  # SentencePiece byte fallback
    for t in added:
        control = t.get("special") or _looks_special(t["content"])
        tokens[t["id"]] = t["content"]
        types[t["id"]] = gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED
    merges = _merge_strings(model.get("merges") or [])
    is_lmforge = all(name in ids for name in SPECIAL_TOKENS)
    special_ids = _special_ids(config, model_config or {}, ids, model, vocab_size, is_lmforge)

    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    elif is_lmforge:
        add_bos = True  # every training document starts with <|bos|> (data.py)
    else:  # a post-processor template that opens with a special token (Llama 3's <|begin_of_text|>)
        add_bos = any(s.get("type") == "TemplateProcessing" and "SpecialToken" in (s.get("single") or [{}])[0]
                      for s in _steps(spec.get("post_processor")))
    chat_template = config.get("chat_template")
    if chat_template is None and (folder / "chat_template.jinja").is_file():  # transformers >= 4.43 keeps it apart
        chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    common = dict(tokens=tokens, special_ids=special_ids, add_bos=add_bos, add_eos=config.get("add_eos_token"),
                  chat_template=chat_template)

    if byte_level:
        return Vocab("gpt2", _pre_tokenizer_name(spec, path), token_types=[int(t) for t in types], merges=merges,
                     **common)
    # SentencePiece-style: llama.cpp merges the adjacent pair whose concatenation scores highest, so
    # a token's score is minus the rank of the first merge that makes it.
    if "unk" in special_ids:
        types[special_ids["unk"]] = gguf.TokenType.UNKNOWN
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        rank_of.setdefault(merge.replace(" ", "", 1), rank)
    return Vocab("llama", "default", token_types=[int(t) for t in types], merges=[],
                 scores=[-float(rank_of.get(t, 0)) for t in tokens],
                 add_space_prefix=_sentencepiece_prefix(spec, config), **common)


# ----------------------------------------------------------------------------- writing

def _add_metadata(w: gguf.GGUFWriter, hp: Hparams, name: str, file_type) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(hp.vocab_size)
    w.add_context_length(hp.context_length)
    w.add_embedding_length(hp.hidden_size)
    w.add_block_count(hp.num_layers)
    w.add_feed_forward_length(hp.intermediate_size)
    w.add_head_count(hp.num_heads)
    w.add_head_count_kv(hp.num_kv_heads)
    if hp.model_type == "gpt2":
        w.add_layer_norm_eps(hp.norm_eps)
        return
    w.add_layer_norm_rms_eps(hp.norm_eps)
    if hp.head_dim * hp.num_heads != hp.hidden_size:  # llama.cpp's default is hidden_size / heads
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    if (hp.rope_scaling or {}).get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(hp.rope_scaling["factor"])
    if hp.sliding_window is not None:
        w.add_sliding_window(hp.sliding_window)


def _add_vocab(w: gguf.GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.token_types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges:
        w.add_token_merges(v.merges)
    for kind, token_id in (v.special_ids or {}).items():
        getattr(w, f"add_{kind}_token_id")(token_id)
    w.add_add_bos_token(v.add_bos)
    if v.add_eos is not None:
        w.add_add_eos_token(bool(v.add_eos))
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def _importance(folder: Path, tokenizer_path: Path, hp: Hparams, calibration: str) -> dict[str, torch.Tensor]:
    """Importance vectors of the model's matrices over the calibration text (gguf_quants.collect_importance)."""
    from lmforge.checkpoint import load_model
    from lmforge.tokenizer import load_tokenizer

    seconds = time.monotonic()
    windows = calibration_windows(load_tokenizer(tokenizer_path), calibration_text(calibration),
                                  min(CALIBRATION_SEQ_LEN, hp.context_length))
    importance = collect_importance(load_model(folder, dtype=torch.float32), windows)
    print0(f"calibration: {sum(map(len, windows))} tokens of {calibration} in {time.monotonic() - seconds:.0f} s")
    return importance


def _note_fallbacks(plan: list[PlannedTensor]) -> None:
    """One printed line per kind of row-length fallback (the docstring of gguf_quants.tensor_qtype)."""
    fallbacks = Counter((t.wanted, t.qtype, t.shape[-1]) for t in plan if t.wanted is not None and t.wanted != t.qtype)
    for (wanted, got, cols), n in fallbacks.items():
        print0(f"note: {n} {'matrix' if n == 1 else 'matrices'} with rows of {cols} values (not a multiple of "
               f"{wanted.name}'s {gguf.GGML_QUANT_SIZES[wanted][0]}-value blocks) written as {got.name}, "
               "as llama-quantize does")


def export_gguf(folder: str | os.PathLike, out_path: str | os.PathLike, *, dtype: str = "auto",
                quant: str | None = None, calibration: str | None = DEFAULT_CORPUS,
                tokenizer: str | os.PathLike | None = None, name: str | None = None,
                overwrite: bool = False) -> Path:
    """Write the model folder `folder` (config.json, model.safetensors, tokenizer.json) as one GGUF file.

    dtype: precision of the matrices, "auto" (the source's), "f32", "f16" or "bf16". quant: instead,
    a quantised file (gguf_quants.QUANTS: "q8_0", "q4_0", ..., "q4_k"), its rounding weighted by the
    activations over `calibration`: "stdlib" (a slice of the default corpus), a text file, or None
    (no calibration: weights by magnitude). tokenizer: the tokenizer.json, when it is not in `folder`
    (a training checkpoint's lives in the run folder). name: general.name, the folder's name by
    default. An existing file at out_path is refused unless `overwrite`. The file is written under a
    temporary name, fsynced and renamed into place.
    """
    folder, out_path = Path(folder), Path(out_path)
    calibration_file = calibration if quant is not None and calibration not in (None, DEFAULT_CORPUS) else None
    check_output(out_path, overwrite=overwrite, inputs=(folder, tokenizer, calibration_file), kind="file")
    if dtype != "auto" and dtype not in OUT_DTYPES:
        raise LmforgeError(f"dtype={dtype!r}: choose auto, {', '.join(OUT_DTYPES)}")
    if quant is not None and quant not in QUANTS:
        raise LmforgeError(f"quant={quant!r}: choose {', '.join(QUANTS)}")
    if quant is not None and dtype != "auto":
        raise LmforgeError(f"dtype={dtype!r} and quant={quant!r}: give one (a quantised file keeps 1-D tensors in f32)")
    raw = _read_json(folder / CONFIG_FILE)
    if raw is None:
        raise LmforgeError(f"{folder}: no {CONFIG_FILE}; export takes a model folder (lmforge saves one per run "
                           "under runs/<name>/model; `lmforge import` makes one from a Hugging Face checkpoint)")
    hp = read_hparams(raw, str(folder / CONFIG_FILE))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise LmforgeError(f"{folder}: no {WEIGHTS_FILE}; `lmforge import` turns sharded or pickled weights into one")
    verify_manifest(folder)
    header, _, _ = read_header(weights)
    if "tie_word_embeddings" not in raw:  # Hugging Face leaves out a field at its default: the file tells
        hp = dataclasses.replace(hp, tie_word_embeddings="lm_head.weight" not in header)
    if quant is not None:
        matrix_qtype, file_type = None, QUANTS[quant][1]
    else:
        if dtype == "auto":
            embedding = "transformer.wte.weight" if hp.model_type == "gpt2" else "model.embed_tokens.weight"
            dtype = _SOURCE_DTYPES.get((header.get(embedding) or {}).get("dtype"), "f32")
        matrix_qtype, file_type = OUT_DTYPES[dtype]
    plan = plan_tensors(hp, header, weights, matrix_qtype, quant)
    tokenizer_path = Path(tokenizer) if tokenizer is not None else folder / TOKENIZER_FILE
    vocab = read_vocab(tokenizer_path, hp.vocab_size, raw)
    importance = {}
    if quant is not None:
        _note_fallbacks(plan)
        if calibration is not None:
            importance = _importance(folder, tokenizer_path, hp, calibration)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[hp.arch])
    _add_metadata(writer, hp, name or folder.resolve().name, file_type)
    _add_vocab(writer, vocab)
    for t in plan:
        if t.qtype in _NUMPY:
            numpy_dtype = np.dtype(_NUMPY[t.qtype][1])
            writer.add_tensor_info(t.name, t.shape, numpy_dtype, int(np.prod(t.shape)) * numpy_dtype.itemsize,
                                   raw_dtype=t.qtype)
        else:  # the element shape, with the byte count of the quantised blocks
            block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32),
                                   int(np.prod(t.shape)) // block * type_size, raw_dtype=t.qtype)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{secrets.token_hex(4)}.tmp")  # never a name already there
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with safe_open(weights, framework="pt") as f:
            for t in plan:  # one tensor in memory at a time
                data = t.load(f)
                assert tuple(data.shape) == t.shape, (t.name, tuple(data.shape), t.shape)
                if t.qtype in _NUMPY:
                    writer.write_tensor_data(_to_numpy(data, t.qtype))
                    continue
                x = data.float().reshape(-1, t.shape[-1])
                w = importance.get(t.source)
                writer.write_tensor_data(quantize(x, t.qtype, w if w is not None else default_weights(x))[0])
        writer.close()
        fsync_file(tmp)
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    finally:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out_path
