"""The one place for device, precision, seeding, distributed set-up and rank-0 printing.

Every other module asks here instead of deciding for itself, so a precision or device policy
changes in one spot (STYLE.md: "One precision/device policy in one place").
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# re-exported: the user-error exception and atomic writes live in base.py, which does not import torch
from lmforge.base import LmforgeError, atomic_write_bytes, atomic_write_text  # noqa: F401

# ----------------------------------------------------------------------------- device and precision

def get_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU. An explicit name is checked, not trusted."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix units (Intel AMX or AVX512-BF16).

    Without them bf16 matmuls take slow paths: on the 2-core AVX2 EPYC of BENCHMARKS.md a depth-4
    model trained at 73 tokens/s under bf16 autocast against 1,787 in fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device, *, decoding: bool = False) -> torch.dtype:
    """Compute dtype for autocast. 'auto': bf16 where the hardware runs it fast, else fp32.

    Weights and optimizer state stay fp32 either way (mixed precision, not low precision).
    decoding: for token-by-token generation, where 'auto' on CPU is fp32. There autocast recasts
    every weight at every step, and a decode step reads each weight once, so the casts cost more
    than bf16 matmuls save: one decode step of a 1.3M-parameter model took 1.78 ms under bf16
    autocast vs 0.93 ms in fp32 on a 2-core AVX-512-BF16 EPYC (bench/serve.py's shape). A bf16
    checkpoint still runs in bf16: its weights are loaded as stored.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16() and not decoding:
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise LmforgeError(f"--dtype {name}: unknown precision; choose one of auto, {', '.join(DTYPES)}")
    if DTYPES[name] == torch.float16 and device.type == "cpu":
        raise LmforgeError("--dtype fp16 needs a GPU; on CPU use bf16 or fp32")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for forward passes; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def kv_cache_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype keys/values are stored in: the one attention computes them in, i.e. the autocast
    dtype, or under fp32 the weights' own (a bf16 checkpoint run without autocast). A mismatch
    breaks attention's matmul."""
    return dtype if dtype != torch.float32 else next(model.parameters()).dtype


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """Measured dense matmul throughput, the denominator of MFU on machines without a spec sheet:
    the best of six windows, so a moment of load from a neighbour on a shared host does not lower
    the peak (a single 0.3 s window once gave bench/train_throughput.py an fp32 MFU of 107%)."""
    import time

    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(6):
        synchronize(device)
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 6:
            a @ b
            count += 1
        synchronize(device)
        best = max(best, 2 * n**3 * count / (time.perf_counter() - t0))
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else run alone.

    NCCL on GPU, gloo on CPU. Each rank takes the GPU of its local rank.
    """
    device = get_device(device_name)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(0, 0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, device)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)
