"""GGUF header pre-check: every count, length, type and offset in a GGUF file's header checked
against the file itself before `gguf.GGUFReader` is let near it.

Why a second parser. GGUFReader (gguf-py) takes the header at its word: a string length past the
end of the file comes back as a short slice that fails later as an IndexError, a reshape
ValueError or a UnicodeDecodeError; an array count of 2**40 sets it looping, building one numpy
view per item (about 1 KiB each, measured) until memory runs out; nested arrays recurse without a
bound. So this walks the header once with `struct`, in the layout of the format spec
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), reading nothing it has not bounded:

    "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
    kv_count x      key: string | value_type u32 | value
    tensor_count x  name: string | n_dims u32 | dims u64 x n_dims (innermost first) | ggml_type u32 | offset u64
    zero padding to general.alignment (32 by default) | tensor data, each offset relative to its start
    string = length u64 | UTF-8 bytes;  array = item_type u32 | count u64 | items

Every fault is one LmforgeError line naming the file and what is wrong. Besides the bounds it
refuses what GGUFReader would choke on (duplicate keys or tensor names, undecodable names, an
unknown value or tensor type, a bad general.alignment) and a header whose values would cost the
reader more memory than the model being imported (`memory_budget_bytes`).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from lmforge.base import LmforgeError

V = gguf.GGUFValueType
# fixed-size value types -> struct format (little-endian)
_SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
            V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
_MIN_ITEM_BYTES = {**{t: struct.calcsize("<" + f) for t, f in _SCALARS.items()},
                   V.STRING: 8, V.ARRAY: 12}  # a string's length field; an array's type and count
READER_BYTES_PER_ITEM = 1024  # GGUFReader's memory per metadata value, measured: ~0.7 KiB a numpy view
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ...; real files nest none
MAX_DIMS = 4  # GGML_MAX_DIMS
MIN_BUDGET_BYTES = 256 << 20  # always allowed for metadata: ~260k values, a 250k-token vocabulary
MAX_ELEMENTS_PER_BYTE = 6  # the densest GGML types (IQ1_S, TQ1_0) pack ~5 weights a byte
READER_VALUES_PER_TENSOR = 8  # GGUFReader's numpy views for one tensor's info and data


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy (row-major) order, the reverse of the file's
    offset: int  # absolute, in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    version: int
    n_values: int  # the values GGUFReader will build: each array item, ~8 per tensor
    data_offset: int
    tensors: list[TensorInfo]


class _Cursor:
    """Bounded little-endian reads from a buffer; a read past the end raises with what was being read."""

    def __init__(self, path: Path, buf, size: int, max_values: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0
        self.max_values = max_values  # more metadata values than this are refused before they are walked

    def fail(self, what: str):
        raise LmforgeError(f"{self.path}: {what}; the file is truncated, corrupt or not a GGUF model")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"{what} needs {n:,} bytes at offset {self.pos:,}, past the end of the file "
                      f"({self.size:,} bytes)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return values[0] if len(values) == 1 else values

    def string(self, what: str, decode: bool) -> str | None:
        n = self.unpack("Q", f"the length of {what}")
        if n > self.size - self.pos:
            self.fail(f"{what} claims to be {n:,} bytes long at offset {self.pos:,}, more than the "
                      f"{self.size - self.pos:,} bytes left in the file")
        raw, self.pos = self.buf[self.pos:self.pos + n], self.pos + n
        if not decode:
            return None
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")


def _value_type(cur: _Cursor, raw: int, what: str) -> gguf.GGUFValueType:
    try:
        return V(raw)
    except ValueError:
        cur.fail(f"{what} has value type {raw}, which no GGUF version defines")


def _skip_value(cur: _Cursor, vtype, what: str, depth: int = 0) -> int:
    """Step over one value; return how many values GGUFReader will make of it."""
    if vtype in _SCALARS:
        cur.need(_MIN_ITEM_BYTES[vtype], what)
        cur.pos += _MIN_ITEM_BYTES[vtype]
        return 1
    if vtype == V.STRING:
        cur.string(what, decode=False)
        return 1
    if depth >= MAX_ARRAY_DEPTH:
        cur.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
    item_type = _value_type(cur, cur.unpack("I", f"the item type of {what}"), what)
    count = cur.unpack("Q", f"the length of {what}")
    # Bound the count by the bytes left before looping over it: a short file cannot hold a long array.
    if count * _MIN_ITEM_BYTES[item_type] > cur.size - cur.pos:
        cur.fail(f"{what} claims {count:,} items of {item_type.name}, more than the {cur.size - cur.pos:,} bytes "
                 "left in the file can hold")
    if count > cur.max_values:
        _too_many_values(cur, count, cur.max_values * READER_BYTES_PER_ITEM)
    if item_type in _SCALARS:
        cur.pos += count * _MIN_ITEM_BYTES[item_type]
        return count
    return sum(_skip_value(cur, item_type, f"{what}[{i}]", depth + 1) for i in range(count)) or 1


def _too_many_values(cur: _Cursor, n_values: int, budget: int):
    raise LmforgeError(f"{cur.path}: the header holds {n_values:,} or more metadata values, about "
                       f"{n_values * READER_BYTES_PER_ITEM / 2**20:,.0f} MiB in gguf's reader: more than the "
                       f"{budget / 2**20:,.0f} MiB allowed (the model's own size, {MIN_BUDGET_BYTES >> 20} MiB at "
                       "least), so this is no real model's header")


def check_header(path: str | Path, bytes_per_weight: int = 4) -> Header:
    """Walk the header of the GGUF file at `path` and check it whole (see the module docstring).

    bytes_per_weight: the precision the caller will write the weights in, which sets the memory the
    metadata may cost: the larger of MIN_BUDGET_BYTES and the dequantised model itself."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise LmforgeError(f"{path}: {size} bytes, too short for a GGUF header (24 bytes at least); "
                                   "the file is truncated or not a GGUF model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                # The model cannot be larger than its file's densest packing: a first bound on the metadata.
                ceiling = max(MIN_BUDGET_BYTES, size * MAX_ELEMENTS_PER_BYTE * bytes_per_weight)
                return _walk(_Cursor(path, buf, size, ceiling // READER_BYTES_PER_ITEM), bytes_per_weight)
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LmforgeError(f"{path}: a folder, not a .gguf file") from None


def _walk(cur: _Cursor, bytes_per_weight: int) -> Header:
    path = cur.path
    magic = cur.unpack("I", "the magic number")
    if magic != gguf.GGUF_MAGIC:
        raise LmforgeError(f"{path}: starts with {bytes(cur.buf[:4])!r}, not the GGUF magic b'GGUF'; "
                           "this is not a GGUF file")
    version = cur.unpack("I", "the version")
    if version & 0xFFFF == 0 and version:
        raise LmforgeError(f"{path}: a big-endian GGUF file; lmforge reads little-endian ones (convert it again "
                           "without --bigendian)")
    if version not in (2, 3):
        raise LmforgeError(f"{path}: GGUF version {version}; lmforge reads versions 2 and 3 (convert the model "
                           "again with a current llama.cpp)")
    n_tensors, n_kv = cur.unpack("QQ", "the tensor and key counts")
    # Each key costs at least 13 bytes (length, type, one byte of value), each tensor info 24.
    if n_kv * 13 + n_tensors * 24 > cur.size - cur.pos:
        cur.fail(f"the header claims {n_kv:,} keys and {n_tensors:,} tensors, more than the file can hold")
    if n_tensors * READER_VALUES_PER_TENSOR > cur.max_values:
        _too_many_values(cur, n_tensors * READER_VALUES_PER_TENSOR, cur.max_values * READER_BYTES_PER_ITEM)

    keys: set[str] = set()
    n_values, alignment = 0, gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.string(f"key {i}", decode=True)
        if key in keys:
            cur.fail(f"key {key!r} appears twice")
        keys.add(key)
        vtype = _value_type(cur, cur.unpack("I", f"the type of {key}"), key)
        if key == gguf.Keys.General.ALIGNMENT:
            if vtype != V.UINT32:
                cur.fail(f"{key} is a {vtype.name}, not a UINT32")
            alignment = cur.unpack("I", key)
            if alignment == 0 or alignment & (alignment - 1):
                cur.fail(f"{key}={alignment} is not a power of two")
            n_values += 1
            continue
        n_values += _skip_value(cur, vtype, key)
        if n_values > cur.max_values:
            _too_many_values(cur, n_values, cur.max_values * READER_BYTES_PER_ITEM)

    infos, names = [], set()
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}", decode=True)
        if name in names:
            cur.fail(f"tensor {name} appears twice")
        names.add(name)
        n_dims = cur.unpack("I", f"the rank of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = cur.unpack("Q" * n_dims, f"the shape of tensor {name}")
        dims = (dims,) if n_dims == 1 else dims
        raw_type = cur.unpack("I", f"the type of tensor {name}")
        offset = cur.unpack("Q", f"the offset of tensor {name}")
        try:
            ggml_type = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            cur.fail(f"tensor {name} has type id {raw_type}, which no GGML version defines")
        block, type_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        if 0 in dims or dims[0] % block:
            cur.fail(f"tensor {name} has shape {list(dims)}, not rows of whole {ggml_type.name} blocks of {block}")
        n_elements = 1
        for d in dims:
            n_elements *= d
        infos.append((name, ggml_type, tuple(reversed(dims)), offset, n_elements // block * type_bytes))
    data_offset = cur.pos + -cur.pos % alignment

    tensors = []
    for name, ggml_type, shape, offset, n_bytes in infos:
        if offset % alignment:
            cur.fail(f"tensor {name} starts at data offset {offset:,}, not a multiple of the alignment {alignment}")
        if data_offset + offset + n_bytes > cur.size:
            cur.fail(f"tensor {name} ({ggml_type.name}, shape {list(shape)}) spans bytes {data_offset + offset:,} to "
                     f"{data_offset + offset + n_bytes:,}, past the end of the file ({cur.size:,} bytes)")
        tensors.append(TensorInfo(name, ggml_type, shape, data_offset + offset, n_bytes))

    n_values += n_tensors * READER_VALUES_PER_TENSOR
    budget = max(MIN_BUDGET_BYTES, sum(t.n_elements for t in tensors) * bytes_per_weight)
    if n_values * READER_BYTES_PER_ITEM > budget:
        _too_many_values(cur, n_values, budget)
    return Header(version, n_values, data_offset, tensors)
