"""safetensors files read and written one tensor at a time, hashed on the way.

The `safetensors` library loads a whole file (`load_file`) or maps it (`safe_open`), and writes
only from a dict held in memory. Loading a checkpoint should cost its size in memory and no more
(a 16 GB model on a 24 GB machine), and its sha256 should not need a second pass over the file.
The format is simple enough to stream (https://github.com/huggingface/safetensors#format):

    8 bytes    N, little-endian u64
    N bytes    JSON header: {name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
               "__metadata__": {str: str}}, padded with spaces
    rest       tensor bytes, offsets relative to the end of the header

so each tensor is read straight into its own freshly allocated storage (`readinto`), and the bytes
feed the hash as they pass. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from lmforge.common import LmforgeError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER_BYTES = 100 << 20  # the reference implementation's limit


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries by name, metadata, byte offset where the data starts). Checks every entry."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
            if n is None or n > _MAX_HEADER_BYTES:
                raise ValueError("no valid header length")
            header = json.loads(f.read(n))
            file_size = path.stat().st_size
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: not a safetensors file ({e}); the file is corrupt or of another format") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = file_size - 8 - n
    for name, entry in header.items():
        begin, end = entry.get("data_offsets", (0, -1))
        if entry.get("dtype") not in DTYPES:
            raise LmforgeError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, which lmforge does not read")
        nbytes = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise LmforgeError(f"{path}: tensor {name} lies outside the file or has the wrong size; "
                               "the file is truncated or corrupt")
    return header, metadata, 8 + n


def iter_tensors(path: str | Path, *, sha256: str | None = None,
                 dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order, each read into its own memory.

    With `sha256`, the whole file is hashed as it is read and a mismatch raises after the last
    tensor, before the caller can finish building anything from them. `dtype` converts floating
    tensors one at a time (never the whole model twice).
    """
    path = Path(path)
    header, _, data_start = read_header(path)
    hasher = hashlib.sha256() if sha256 else None
    with open(path, "rb") as f:
        if hasher:
            hasher.update(f.read(data_start))
        f.seek(data_start)
        position = 0
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            if begin > position:  # padding between tensors still counts for the hash
                gap = f.read(begin - position)
                if hasher:
                    hasher.update(gap)
            tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if f.readinto(buffer) != end - begin:
                raise LmforgeError(f"{path}: ends inside tensor {name}; the file is truncated")
            if hasher:
                hasher.update(buffer)
            position = end
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            yield name, tensor
        if hasher:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                hasher.update(chunk)
    if hasher and hasher.hexdigest() != sha256:
        raise LmforgeError(f"{path}: sha256 does not match manifest.json; the file is corrupt or was changed. "
                           "Copy it again from its source")


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor by name (for a file whose header was already read)."""
    header, _, data_start = read_header(path)
    entry = header[name]
    tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
    with open(path, "rb") as f:
        f.seek(data_start + entry["data_offsets"][0])
        f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return tensor


def write_tensors(path: str | Path, specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                  produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file from (name, shape, dtype) specs, calling produce(name) for one
    tensor at a time; return the file's sha256. The result loads with the `safetensors` library."""
    specs = list(specs)
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
    hasher = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            hasher.update(chunk)
        for name, shape, dtype in specs:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise AssertionError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {dtype}")
            data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            hasher.update(data)
    return hasher.hexdigest()
