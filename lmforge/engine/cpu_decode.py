"""An engine step in one C++ call on CPU (csrc/cpu_decode.cpp): every decoding sequence's new token
and every prompt chunk of up to model_runner.KERNEL_MAX_CHUNK tokens, one row per token.

At serving sizes a CPU decode step is bound by dispatch, not arithmetic: the eager model makes a
few hundred small op calls a step, each a Python binding, a dispatch and a fresh tensor. The
kernel keeps the matmuls as ATen calls (MKL/oneDNN, into buffers kept between steps) and does the
rest in plain loops, attention included, reading keys and values through the block table where the
eager path gathers each sequence's cache into a padded batch at every layer.

It is built on first use with PyTorch's C++ extension loader (a C++ compiler and ninja, as for any
torch extension; about a minute, then cached under TORCH_EXTENSIONS_DIR) for this machine's CPU.
Where that fails, or for models it does not cover (not the Llama family, not fp32, not on CPU), the
engine runs the eager model as before; LMFORGE_CPU_KERNELS=0 turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from lmforge.model import Transformer

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_decode.cpp"


def _build_tag() -> str:
    """Names the build for this source, CPU, Python and torch: it is compiled with -march=native against
    one torch's ABI, and a home folder shared between machines or environments must not hand one's
    build to another."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    built_for = f"{platform.machine()} {flags} {sys.version_info[:2]} torch {torch.__version__}"
    return hashlib.sha1(built_for.encode() + SOURCE.read_bytes()).hexdigest()[:12]


def build_dir() -> Path:
    """Where this source's build for this machine lives, under torch's extensions root."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"lmforge_cpu_decode_{_build_tag()}"


def enabled() -> bool:
    return os.environ.get("LMFORGE_CPU_KERNELS", "1") != "0"


def is_built() -> bool:
    return any(build_dir().glob("*.so"))


@functools.cache
def load_kernel():
    """The compiled extension module, or None (and the reason logged once) where it cannot be built."""
    if not enabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        build = build_dir()
        build.mkdir(parents=True, exist_ok=True)
        # A build killed midway (Ctrl-C at a first start) leaves its lock behind, and torch would wait
        # on it for ever; a build takes about a minute, so a lock ten minutes old is stale.
        lock = build / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:
            lock.unlink(missing_ok=True)
        if not is_built():
            log.info("building the CPU decode kernel in %s (once per machine, about a minute)", build)
        return load(name=build.name, sources=[str(SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a build error: the eager path still works
        log.warning("CPU decode kernel unavailable (%s: %s); decoding runs the eager model",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def supports(model: torch.nn.Module, kv_dtype: torch.dtype) -> bool:
    """Whether the kernel covers this model as the engine runs it. Only a model whose projections
    engine/fuse.py merged: one the engine owns, whose weights the kernel may hold. (RL samples from
    a policy it is training; a model passed in as it is keeps the eager path, which reads its
    current weights at every step.)"""
    if not isinstance(model, Transformer) or not hasattr(model.model.layers[0].self_attn, "qkv_weight"):
        return False  # GPT-2 has its own file and layout
    weight = model.model.embed_tokens.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and kv_dtype == torch.float32


class CpuDecoder:
    """The model's weights handed to the kernel once; `step` runs one batch of rows."""

    def __init__(self, model: Transformer, kernel):
        c, m = model.config, model.model
        self._decoder = kernel.CpuDecoder(
            _t(m.embed_tokens.weight), _t(m.norm.weight), _t(model.lm_head.weight), model.rope_cos.contiguous(),
            model.rope_sin.contiguous(), c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.rms_norm_eps, c.sliding_window or 0)
        for layer in m.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            self._decoder.add_layer(
                _t(layer.input_layernorm.weight), _t(attn.qkv_weight), _t(attn.qkv_bias),
                _t(q_norm and q_norm.weight), _t(k_norm and k_norm.weight), _t(attn.o_proj.weight),
                _t(attn.o_proj.bias), _t(layer.post_attention_layernorm.weight), _t(mlp.gate_up_weight),
                _t(mlp.gate_up_bias), _t(mlp.down_proj.weight), _t(mlp.down_proj.bias))

    @classmethod
    def for_model(cls, model: torch.nn.Module, kv_dtype: torch.dtype) -> CpuDecoder | None:
        if not supports(model, kv_dtype):
            return None
        kernel = load_kernel()
        return cls(model, kernel) if kernel is not None else None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: torch.Tensor, tables: torch.Tensor,
             slots: torch.Tensor, logit_rows: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             block_size: int) -> torch.Tensor:
        """tokens, positions, seqs (which row of tables), slots (B,) int64, one row per new token; tables
        (S, W) int64; logit_rows (R,) int64; pools (L, slots, K, Hd) written in place. Returns fp32
        logits (R, V)."""
        return self._decoder.step(tokens, positions, seqs, tables, slots, logit_rows, k_pool, v_pool, block_size)


def _t(t: torch.Tensor | None) -> torch.Tensor | None:
    """What the kernel holds: the same storage (weights are contiguous as loaded), row-major as its loops read."""
    return None if t is None else t.detach().contiguous()
