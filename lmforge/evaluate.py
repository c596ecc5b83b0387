"""Held-out quality: bits per byte of a model, and of general-purpose compressors on the same bytes.

Bits per byte (bpb) does not depend on the tokenizer, so models with different vocabularies,
and compressors, compare on one scale: total cross-entropy in bits over the held-out text,
divided by its UTF-8 byte count. Special tokens (<|bos|> between documents) stand for no
bytes; predicting them is neither counted in the bits nor in the bytes (nanochat's
convention), so the byte count is exactly the held-out documents' bytes, the same bytes the
compressors see.
"""

from __future__ import annotations

import lzma
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from lmforge.common import LmforgeError, autocast
from lmforge.data import TokenStream, read_meta


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """A binomial proportion's confidence interval (Wilson score; 95% at z=1.96): unlike the normal
    approximation it stays inside [0, 1] and is honest at 0/n and n/n, where small evals often sit."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, tokens: np.ndarray, token_bytes: torch.Tensor, *, seq_len: int,
                 batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 max_tokens: int | None = None) -> dict:
    """Cross-entropy of every token after the first, in consecutive windows of seq_len.

    tokens: 1-D stream of ids (held-out split); token_bytes: (V,) bytes per id (0 for specials).
    max_tokens evaluates only a prefix (the periodic in-training check); None uses everything.
    """
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    n = len(tokens) - 1
    num_windows = math.ceil(n / seq_len)
    padded = np.full(num_windows * seq_len + 1, -1, dtype=np.int64)
    padded[: len(tokens)] = tokens
    inputs = torch.from_numpy(padded[:-1].reshape(num_windows, seq_len).copy())
    inputs[inputs < 0] = 0  # padding positions: any valid id, their targets are ignored
    targets = torch.from_numpy(padded[1:].reshape(num_windows, seq_len).copy())
    token_bytes = token_bytes.to(device)
    was_training = model.training
    model.eval()
    total_nats, total_bytes = 0.0, 0
    for i in range(0, num_windows, batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        with autocast(device, dtype):
            loss = model(x, y, loss_reduction="none")  # (b, T) nats; 0 where y == -1
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        total_nats += (loss.float() * (nbytes > 0)).sum().item()
        total_bytes += nbytes.sum().item()
    model.train(was_training)
    return {"bpb": total_nats / math.log(2) / max(1, total_bytes), "num_tokens": n, "num_bytes": total_bytes}


def compressor_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of xz -9 and zlib -9 on the same bytes: the baselines a model must beat."""
    n = max(1, len(data))
    return {"xz -9": 8 * len(lzma.compress(data, preset=9)) / n,
            "zlib -9": 8 * len(zlib.compress(data, 9)) / n}


def evaluate_heldout(model: torch.nn.Module, data_dir, *, seq_len: int, batch_size: int, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> dict:
    """evaluate_bpb over a shard folder's whole held-out split, with the compressors on its val.txt
    (the very bytes the model is scored on) where the folder has one."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if meta["vocab_size"] != model.config.vocab_size:
        raise LmforgeError(f"{data_dir} was tokenized with {meta['vocab_size']} tokens but the model has "
                           f"{model.config.vocab_size}; evaluate on shards made with the model's tokenizer")
    result = evaluate_bpb(model, TokenStream(data_dir, "val").all(), torch.tensor(meta["token_bytes"]),
                          seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype)
    val_txt = data_dir / "val.txt"
    if val_txt.exists():
        val_bytes = val_txt.read_bytes()
        assert result["num_bytes"] == len(val_bytes), "model and compressors must see the same bytes"
        result["compressors"] = compressor_bpb(val_bytes)
    return result
