"""GGUF import: one .gguf file (llama.cpp, Ollama, LM Studio) as an lmforge model folder, the
inverse of export_gguf.py. `lmforge import FILE.gguf --out DIR` writes what an import of a Hugging
Face folder writes (hf.py): config.json, model.safetensors under Hugging Face names, tokenizer.json
and tokenizer_config.json (rebuilt from the tokenizer.ggml.* metadata by gguf_vocab.py), a
manifest, and a README.md model card with the file's general.name and general.license.

    GGUF arch   imports as   what changes on the way
    llama       llama        q/k rows permuted back from GGML's adjacent-pair rotary to rotate-half;
                             a rope_freqs tensor (Llama 3.1+) becomes rope_scaling {"rope_type": "llama3"}
                mistral      the same, when the file states attention.sliding_window
    qwen2       qwen2        nothing (q/k/v biases)
    qwen3       qwen3        nothing (attn_q_norm/attn_k_norm become q_norm/k_norm)
    gpt2        gpt2         (out, in) matrices transposed to Conv1D's (in, out)

Mistral. llama.cpp has no mistral architecture: its converter writes Mistral 7B as `llama` and
drops v0.1's 4096-token window (v0.2 and later have none), so such a file imports as llama and runs
as llama.cpp runs it. A window in the file (lmforge's own export writes one) makes it mistral.

Config: the {arch}.* keys map to ModelConfig / GPT2Config field by field as hf.py maps a
config.json (context_length -> max_position_embeddings, embedding_length -> hidden_size, ...); the
shapes the keys do not state come from the tensors: vocab_size from token_embd's rows, biases from
their presence, and the head tied when output.weight is absent (llama.cpp's rule) or holds the very
bytes of token_embd (export_gguf writes such a copy for GPT-2). Tensor names come from gguf's own
table (`gguf.get_tensor_name_map`), inverted: each tensor lmforge's model has is looked up there,
so nothing here spells a GGUF tensor name.

Llama 3's rope_freqs. llama.cpp divides each rotary frequency by rope_freqs[i]; lmforge computes
the same divisors from (factor, low_freq_factor, high_freq_factor, original context). The factor is
the largest divisor; between the two ends the blend is linear in frequency, which fixes two numbers,
so one of the three is free: low_freq_factor is taken as 1 (every Llama 3.x release), and the line
through the blended divisors gives high_freq_factor and the context (Llama 3.1: 1, 4, 8192 come
back exactly). The divisors are recomputed from the result and must match, or the file is refused.

Weights: `gguf.quants.dequantize` (the reference dequantisation transformers also uses) for F32,
F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K-Q6_K, to fp32 (default) or bf16. Any other type is
refused, naming the tensor and the type.

Memory: gguf_check.check_header bounds every count and offset of the header against the file
before gguf.GGUFReader reads it (the reader trusts them: see there). The reader maps the file;
tensors are dequantised one at a time, a few rows at a time, straight into the tensor written
next, and model.safetensors is written tensor by tensor (weights.write_tensors). Peak memory is the
largest tensor plus the file's mapped pages, well under the output's size. The folder is written
beside --out and swapped in whole (checkpoint._write_folder): a failure leaves nothing there.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from lmforge.checkpoint import (
    ARCHITECTURES,
    CONFIG_FILE,
    WEIGHTS_FILE,
    _write_folder,
    build_model,
    check_output,
    config_from_dict,
)
from lmforge.common import LmforgeError
from lmforge.gguf_check import check_header
from lmforge.weights import write_tensors

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "gpt2": gguf.MODEL_ARCH.GPT2}
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK_BYTES = 16 << 20  # fp32 output per dequantisation step; gguf's dequantize holds ~3x this at once
K, V = gguf.Keys, gguf.GGUFValueType
_INTS = (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)
_NAMES = gguf.TENSOR_NAMES
_T = gguf.MODEL_TENSOR
TOKEN_EMBD, OUTPUT, ROPE_FREQS = (_NAMES[t] + ".weight" for t in (_T.TOKEN_EMBD, _T.OUTPUT, _T.ROPE_FREQS))
_MISSING = object()


def shape_of(t: gguf.ReaderTensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy (row-major) order; the file lists it innermost first."""
    return tuple(int(n) for n in reversed(t.shape.tolist()))


# ----------------------------------------------------------------------------- metadata

class Metadata:
    """Typed reads of a GGUFReader's key/value fields; `{arch}` in a key is the file's architecture.
    A missing required key or a value of the wrong type is one line naming the file and the key."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.fields, self.path, self.arch = reader.fields, path, None  # general.architecture has no {arch}
        self.arch = self.text(K.General.ARCHITECTURE, None)

    def _get(self, key: str, kinds: tuple, kind_name: str, default):
        key = key.format(arch=self.arch)
        field = self.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise LmforgeError(f"{self.path}: metadata key {key} is missing; the model's shape needs it")
            return default
        vtype = field.types[0]
        if vtype not in kinds:
            what = "an array" if vtype == V.ARRAY else f"a {vtype.name}"
            raise LmforgeError(f"{self.path}: metadata key {key} is {what}, not {kind_name}; the file is corrupt")
        try:
            return field.contents()
        except UnicodeDecodeError:
            raise LmforgeError(f"{self.path}: metadata key {key} is not UTF-8 text; the file is corrupt") from None

    def integer(self, key: str, default=_MISSING):
        return self._get(key, _INTS, "an integer", default)

    def number(self, key: str, default=_MISSING):
        value = self._get(key, (V.FLOAT32, V.FLOAT64), "a number", default)
        field = self.fields.get(key.format(arch=self.arch))
        if field is not None and field.types[0] == V.FLOAT32:
            # The shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06): what the
            # writer meant, and the very value again wherever it meets fp32 arithmetic.
            value = float(str(np.float32(value)))
        return value

    def text(self, key: str, default=_MISSING):
        return self._get(key, (V.STRING,), "a string", default)


def _positive(meta: Metadata, key: str, value):
    if not isinstance(value, int) or value <= 0:
        raise LmforgeError(f"{meta.path}: metadata key {key.format(arch=meta.arch)}={value!r} must be a positive "
                           "integer; the file is corrupt")
    return value


def llama3_scaling(factors: torch.Tensor, theta: float, head_dim: int, path: Path) -> dict | None:
    """rope_scaling for llama.cpp's per-frequency divisors (rope_freqs, (Hd/2,)); see the module docstring."""
    f = factors.double()
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    refuse = LmforgeError(f"{path}: {ROPE_FREQS} holds frequency divisors that are not a Llama 3 scaling "
                          "(factor, low_freq_factor, high_freq_factor, context); lmforge cannot run them")
    if f.shape != inv_freq.shape or not torch.isfinite(f).all() or f.min() < 1 - 1e-6:
        raise refuse
    factor = f.max().item()
    if factor < 1 + 1e-6:
        return None  # all ones: no scaling
    if (f - factor).abs().max() <= 1e-6 * factor:
        return {"rope_type": "linear", "factor": factor}  # every frequency divided alike
    smooth = ((1 / f - 1 / factor) / (1 - 1 / factor)).clamp(0, 1)  # 0: divided by factor, 1: kept
    blended = (smooth > 1e-6) & (smooth < 1 - 1e-6)
    if blended.sum() >= 2:
        # smooth = (context * inv_freq / 2pi - low) / (high - low) with low = 1: a line a * inv_freq + b
        A = torch.stack([inv_freq[blended], torch.ones_like(inv_freq[blended])], dim=1)
        a, b = torch.linalg.lstsq(A, smooth[blended].unsqueeze(1)).solution.flatten().tolist()
        if b >= 0:
            raise refuse
        high_fit, context_fit = 1 - 1 / b, -2 * math.pi * a / b
    else:  # a step (or one point on the ramp): the fastest divided frequency sits at ratio 1 = low
        kept, divided = inv_freq[smooth >= 1 - 1e-6], inv_freq[smooth <= 1e-6]
        if not len(kept) or not len(divided):
            raise refuse
        context_fit = 2 * math.pi / divided.max().item()
        high_fit = kept.min().item() / divided.max().item()
        if blended.any():
            high_fit = 1 + (context_fit * inv_freq[blended].item() / (2 * math.pi) - 1) / smooth[blended].item()

    def divisors(high: float, context: float) -> torch.Tensor:  # model.rotary_tables' formula, as divisors
        s = ((context * inv_freq / (2 * math.pi) - 1.0) / (high - 1.0)).clamp(0, 1)
        return 1 / ((1 - s) / factor + s)

    # The file's divisors are float32, and the fit as exact as that. Six significant digits give back
    # the round numbers a config states (4.0, 8192) wherever those still reproduce the divisors.
    for high, context, rtol in ((float(f"{high_fit:.6g}"), round(context_fit), 1e-6), (high_fit, context_fit, 1e-5)):
        if high > 1 and torch.allclose(divisors(high, context), f, rtol=rtol, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                    "original_max_position_embeddings": context}
    raise refuse


def read_config(meta: Metadata, tensors: dict, path: Path):
    """lmforge's ModelConfig / GPT2Config for the file, from its {arch}.* keys and tensor shapes."""
    arch = meta.arch
    if arch not in ARCHS:
        what = f"architecture {arch!r}" if arch is not None else f"no {K.General.ARCHITECTURE} key"
        raise LmforgeError(f"{path}: {what}; lmforge imports GGUF architectures {', '.join(ARCHS)} "
                           "(Mistral and Llama 2/3 files are llama)")
    if TOKEN_EMBD not in tensors:
        raise LmforgeError(f"{path}: no {TOKEN_EMBD} tensor; a {arch} model has one")
    vocab_size = shape_of(tensors[TOKEN_EMBD])[0]
    stated_vocab = meta.integer(K.LLM.VOCAB_SIZE, vocab_size)
    if stated_vocab != vocab_size:
        raise LmforgeError(f"{path}: {K.LLM.VOCAB_SIZE.format(arch=arch)}={stated_vocab} but {TOKEN_EMBD} has "
                           f"{vocab_size} rows; the file is corrupt")
    width = _positive(meta, K.LLM.EMBEDDING_LENGTH, meta.integer(K.LLM.EMBEDDING_LENGTH))
    layers = _positive(meta, K.LLM.BLOCK_COUNT, meta.integer(K.LLM.BLOCK_COUNT))
    heads = _positive(meta, K.Attention.HEAD_COUNT, meta.integer(K.Attention.HEAD_COUNT))
    context = _positive(meta, K.LLM.CONTEXT_LENGTH, meta.integer(K.LLM.CONTEXT_LENGTH))
    if meta.integer(K.LLM.EXPERT_COUNT, 0):
        raise LmforgeError(f"{path}: a mixture-of-experts model ({K.LLM.EXPERT_COUNT.format(arch=arch)}="
                           f"{meta.integer(K.LLM.EXPERT_COUNT)}, e.g. Mixtral); lmforge runs dense models only")
    # llama.cpp's rule, and a head stored as a copy of the embedding (export_gguf's GPT-2 files)
    tied = OUTPUT not in tensors or _same_bytes(tensors[OUTPUT], tensors[TOKEN_EMBD])
    if arch == "gpt2":
        ffn = meta.integer(K.LLM.FEED_FORWARD_LENGTH, 4 * width)
        fields = dict(model_type="gpt2", vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=layers,
                      n_head=heads, n_inner=None if ffn == 4 * width else ffn,
                      layer_norm_epsilon=meta.number(K.Attention.LAYERNORM_EPS), tie_word_embeddings=tied)
        return config_from_dict(fields, str(path))

    head_dim = meta.integer(K.Attention.KEY_LENGTH, None)
    if head_dim is None:
        if width % heads:
            raise LmforgeError(f"{path}: {K.Attention.HEAD_COUNT.format(arch=arch)}={heads} does not divide "
                               f"{K.LLM.EMBEDDING_LENGTH.format(arch=arch)}={width}, and no key_length is given")
        head_dim = width // heads
    for key in (K.Attention.VALUE_LENGTH, K.Rope.DIMENSION_COUNT):
        if meta.integer(key, head_dim) != head_dim:  # lmforge rotates whole heads, and v heads are q heads' size
            raise LmforgeError(f"{path}: {key.format(arch=arch)}={meta.integer(key)} differs from the head size "
                               f"{head_dim}; lmforge runs full-width rotary with equal q/k/v heads only")
    theta = meta.number(K.Rope.FREQ_BASE, 10000.0)
    scaling = None
    rope_type = meta.text(K.Rope.SCALING_TYPE, "none")
    # llama.cpp still reads {arch}.rope.scale_linear (LLM_KV_ROPE_SCALE_LINEAR), older files' spelling;
    # gguf-py's Keys has dropped it.
    old_linear = meta.number("{arch}.rope.scale_linear", None)
    if rope_type == "linear" or old_linear not in (None, 1.0):
        scaling = {"rope_type": "linear", "factor": meta.number(K.Rope.SCALING_FACTOR, old_linear)}
    elif rope_type != "none":
        raise LmforgeError(f"{path}: {K.Rope.SCALING_TYPE.format(arch=arch)}={rope_type!r}; lmforge runs linear "
                           "and llama3 rope scaling only")
    if ROPE_FREQS in tensors:
        if arch != "llama" or scaling is not None:
            raise LmforgeError(f"{path}: a {ROPE_FREQS} tensor in a {arch} file with {rope_type} scaling; "
                               "llama.cpp reads it for llama files only")
        scaling = llama3_scaling(dequantize(tensors[ROPE_FREQS], torch.float32, path), theta, head_dim, path)
    window = meta.integer(K.Attention.SLIDING_WINDOW, None)

    def has(gguf_tensor: _T, suffix: str) -> bool:
        return f"{_NAMES[gguf_tensor].format(bid=0)}.{suffix}" in tensors

    qkv_bias, o_bias = has(_T.ATTN_Q, "bias"), has(_T.ATTN_OUT, "bias")
    if arch == "qwen2":  # Qwen2 always has q/k/v biases and no o_proj bias (the tensor check holds it to that)
        qkv_bias, o_bias = True, False
    model_type = "mistral" if arch == "llama" and window is not None else arch
    fields = dict(
        model_type=model_type, vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=meta.integer(K.Attention.HEAD_COUNT_KV, heads),
        head_dim=head_dim, intermediate_size=meta.integer(K.LLM.FEED_FORWARD_LENGTH), max_position_embeddings=context,
        rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=meta.number(K.Attention.LAYERNORM_RMS_EPS),
        tie_word_embeddings=tied, qkv_bias=qkv_bias, o_proj_bias=o_bias,
        mlp_bias=has(_T.FFN_UP, "bias"), qk_norm=arch == "qwen3", sliding_window=window)
    return config_from_dict(fields, str(path))


# ----------------------------------------------------------------------------- tensors

def dequantize(t: gguf.ReaderTensor, dtype: torch.dtype, path: Path) -> torch.Tensor:
    """A GGUF tensor as a `dtype` tensor in numpy (row-major) order, dequantised a few rows at a time
    into its final storage: never the whole tensor in fp32 beside it, nor gguf's intermediates."""
    if t.tensor_type not in SUPPORTED_TYPES:
        raise LmforgeError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which lmforge does not dequantise; "
                           f"supported: {', '.join(q.name for q in SUPPORTED_TYPES)} (requantise the model, e.g. "
                           "llama-quantize --allow-requantize ... Q8_0)")
    shape = shape_of(t)
    out = torch.empty(shape, dtype=dtype)
    rows_out = out.view(-1, shape[-1])
    rows_in = t.data.reshape(rows_out.shape[0], -1)  # (rows, bytes or items per row)
    step = max(1, CHUNK_BYTES // (4 * shape[-1]))
    for start in range(0, rows_in.shape[0], step):
        part = gguf.quants.dequantize(rows_in[start:start + step], t.tensor_type)  # (rows, cols) float32
        rows_out[start:start + step] = torch.from_numpy(np.array(part, dtype=np.float32, copy=not part.flags.writeable))
    return out


def unpermute_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from GGML's adjacent pairs back to HF's rotate-half layout:
    within each head, row 2i + s moves to row i + s * Hd/2. The inverse of export_gguf.permute_rotary
    (and transformers' `_reverse_permute_weights`), num_heads those of *this* projection (K for k)."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # lmforge's (Hugging Face) name
    source: gguf.ReaderTensor
    shape: tuple[int, ...]  # lmforge's, after `transform`
    transform: Callable | None  # torch.Tensor -> torch.Tensor: the layout change from GGUF's


def plan_tensors(config, arch: str, tensors: dict, path: Path) -> list[PlannedTensor]:
    """Every weight of `config`'s model with the GGUF tensor it comes from, checked: each present
    with its shape and a supported type, and nothing in the file left unused."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    names = gguf.get_tensor_name_map(ARCHS[arch], config.num_hidden_layers)
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    plan, used = [], {ROPE_FREQS}  # rope_freqs is config (rope_scaling), not a weight
    for ours, shape in expected.items():
        theirs = names.get_name(ours, try_suffixes=(".weight", ".bias"))
        assert theirs is not None, ours  # every config read_config makes has a GGUF home
        transform = None
        if arch == "llama" and ".self_attn.q_proj." in ours:
            transform = lambda w: unpermute_rotary(w, config.num_attention_heads)  # noqa: E731
        elif arch == "llama" and ".self_attn.k_proj." in ours:
            transform = lambda w: unpermute_rotary(w, config.num_key_value_heads)  # noqa: E731
        file_shape = shape
        if arch == "gpt2" and ours.endswith(conv1d):
            transform, file_shape = (lambda w: w.T.contiguous()), shape[::-1]  # GGUF keeps (out, in)
        if theirs not in tensors:
            raise LmforgeError(f"{path}: tensor {theirs} is missing; the metadata implies it (as {ours})")
        t = tensors[theirs]
        found = shape_of(t)
        if found != tuple(file_shape):
            raise LmforgeError(f"{path}: tensor {theirs} has shape {list(found)}, the metadata implies "
                               f"{list(file_shape)}")
        if t.tensor_type not in SUPPORTED_TYPES:
            dequantize(t, torch.float32, path)  # raises, naming the tensor and the type
        plan.append(PlannedTensor(ours, t, shape, transform))
        used.add(theirs)
    if config.tie_word_embeddings and OUTPUT in tensors:
        used.add(OUTPUT)  # the embedding again, byte for byte (import_gguf checked)
    unused = [name for name in tensors if name not in used]
    if unused:
        raise LmforgeError(f"{path}: {len(unused)} tensors the {config.model_type} model has no place for "
                           f"({', '.join(unused[:3])}); the file is another variant of the architecture")
    return plan


def _same_bytes(a: gguf.ReaderTensor, b: gguf.ReaderTensor) -> bool:
    return (a.tensor_type == b.tensor_type and a.shape.tolist() == b.shape.tolist()
            and np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)))


# ----------------------------------------------------------------------------- writing

def _card_text(value) -> str:
    """A metadata string fit for one Markdown line: control characters and table bars out, 300 characters."""
    text = "".join(" " if ord(c) < 32 or c == "|" else c for c in str(value)).strip()
    return text if len(text) <= 300 else text[:299] + "…"


CARD_KEYS = (("Organization", K.General.ORGANIZATION), ("Author", K.General.AUTHOR),
             ("Size", K.General.SIZE_LABEL), ("Fine-tune", K.General.FINETUNE), ("Version", K.General.VERSION),
             ("URL", K.General.URL), ("Source", K.General.SOURCE_URL), ("Licence name", K.General.LICENSE_NAME),
             ("Licence link", K.General.LICENSE_LINK))


def model_card(meta: Metadata, path: Path, config, dtype: torch.dtype, types: Counter) -> str:
    name = _card_text(meta.text(K.General.NAME, None) or path.stem)
    licence = meta.text(K.General.LICENSE, None)
    lines = [f"# {name}", "", f"A {config.model_type} causal language model imported by lmforge from the GGUF file "
             f"`{_card_text(path.name)}` (architecture {meta.arch}), dequantised to "
             f"{str(dtype).removeprefix('torch.')}.", "",
             f"- Licence: {_card_text(licence) if licence else 'not stated in the file; ask its publisher'}"]
    for label, key in CARD_KEYS:
        field = meta.fields.get(key)
        if field is not None and field.types == [V.STRING]:
            lines.append(f"- {label}: {_card_text(meta.text(key))}")
    lines += ["", "## Tensors in the file", "", "| GGUF type | tensors |", "|---|---|"]
    lines += [f"| {t} | {n} |" for t, n in sorted(types.items())]
    lines += ["", "## Use", "", "```", "lmforge generate --model path/to/this/folder --prompt \"...\"",
              "lmforge chat --model path/to/this/folder", "```", ""]
    return "\n".join(lines)


def import_gguf(source: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> Path:
    """Turn the GGUF file `source` into an lmforge model folder at `out` (new, empty, or with
    `overwrite` replaced whole once the new one is complete). dtype: float32 (default) or bfloat16."""
    source, out = Path(source), Path(out)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in OUT_DTYPES:
        raise LmforgeError(f"--dtype {dtype}: a GGUF import writes fp32, bf16 or fp16")
    check_output(out, overwrite=overwrite, inputs=(source,))
    check_header(source, bytes_per_weight=dtype.itemsize)  # before the reader trusts a single count
    try:
        reader = gguf.GGUFReader(source)
    except (ValueError, KeyError, IndexError, TypeError) as e:  # the pre-check should leave none of these
        raise LmforgeError(f"{source}: gguf cannot read it ({e}); the file is corrupt") from None
    meta = Metadata(reader, source)
    tensors = {t.name: t for t in reader.tensors}
    config = read_config(meta, tensors, source)
    plan = plan_tensors(config, meta.arch, tensors, source)
    tokens = reader.fields.get(K.Tokenizer.LIST)
    if tokens is not None and len(tokens.data) > config.vocab_size:
        raise LmforgeError(f"{source}: {len(tokens.data):,} tokens but {TOKEN_EMBD} has {config.vocab_size:,} rows; "
                           "the embedding table has no row for the rest, the file is corrupt")
    from lmforge.gguf_vocab import gguf_tokenizer_files  # tokenizer metadata -> tokenizer.json (+ config)

    try:  # before any weight is written: a bad vocabulary costs nothing
        tokenizer_files = gguf_tokenizer_files(reader)
    except LmforgeError as e:  # its messages name the key; this names the file too
        raise LmforgeError(f"{source}: {e}") from None
    types = Counter(t.tensor_type.name for t in reader.tensors)
    card = model_card(meta, source, config, dtype, types)  # reads (and checks) the general.* strings
    facts = {"imported_from": str(source.resolve()), "source_format": "gguf",
             "gguf": {"architecture": meta.arch, "name": meta.text(K.General.NAME, None),
                      "license": meta.text(K.General.LICENSE, None), "tensor_types": dict(types)}}

    def write(tmp: Path):
        by_name = {p.name: p for p in plan}

        def produce(name: str) -> torch.Tensor:  # one tensor in memory at a time
            p = by_name[name]
            w = dequantize(p.source, dtype, source)
            return p.transform(w) if p.transform is not None else w

        write_tensors(tmp / WEIGHTS_FILE, [(p.name, p.shape, dtype) for p in plan], produce,
                      metadata={"format": "pt"})
        config_json = {**config.to_dict(), "architectures": [ARCHITECTURES[config.model_type]], "lmforge": facts}
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json, indent=2))
        for file_name, content in tokenizer_files.items():
            (tmp / file_name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")

    return _write_folder(out, write)

