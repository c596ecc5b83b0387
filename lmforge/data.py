"""Token shards on disk and the deterministic, resumable loader that reads them.

A shard is a `.npy` file of uint16 (or uint32 for vocabularies over 65,536) token ids:
documents back to back, each preceded by the tokenizer's <|bos|>. `.npy` carries its own
dtype and length, and `np.load(mmap_mode="r")` maps it without reading it, so a corpus larger
than memory trains the same way. A `meta.json` beside the shards records what made them.

The loader cuts the token stream of a split into windows of seq_len + 1 tokens and visits them
in a fresh random order each epoch (seeded by (seed, epoch), with an epoch-dependent offset so
window edges move). Its whole state is (epoch, windows consumed), so resuming is exact, and
under DDP each rank takes its own slice of every global batch, so N ranks see exactly the
batches one process would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from lmforge.common import LmforgeError, atomic_write_text

SHARD_TOKENS = 1 << 24  # 16M tokens (32 MB as uint16) per shard


class ShardWriter:
    """Appends documents' token ids to `{split}_{k:04d}.npy` shards, each doc after a <|bos|>."""

    def __init__(self, out_dir: str | Path, split: str, bos_id: int, vocab_size: int,
                 shard_tokens: int = SHARD_TOKENS):
        self.out_dir, self.split, self.bos_id = Path(out_dir), split, bos_id
        self.dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        self.shard_tokens = shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.num_shards = self.num_tokens = self.num_documents = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(f"{split}_*.npy"):
            stale.unlink()

    def add(self, ids: list[int]) -> None:
        doc = np.empty(len(ids) + 1, dtype=self.dtype)
        doc[0] = self.bos_id
        doc[1:] = ids
        self.buffer.append(doc)
        self.buffered += len(doc)
        self.num_tokens += len(doc)
        self.num_documents += 1
        if self.buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        np.save(self.out_dir / f"{self.split}_{self.num_shards:04d}.npy", np.concatenate(self.buffer))
        self.num_shards += 1
        self.buffer, self.buffered = [], 0

    def close(self) -> dict:
        self._flush()
        return {"num_shards": self.num_shards, "num_tokens": self.num_tokens, "num_documents": self.num_documents}


def write_meta(out_dir: str | Path, meta: dict) -> None:
    atomic_write_text(Path(out_dir) / "meta.json", json.dumps(meta, indent=2))


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise LmforgeError(f"{data_dir}: no meta.json; this is not a token-shard folder. "
                           "Make one with `lmforge run` or `lmforge pretrain --corpus ...`")
    return json.loads(path.read_text())


class TokenStream:
    """All shards of one split, memory-mapped, read as one stream of token ids."""

    def __init__(self, data_dir: str | Path, split: str):
        paths = sorted(Path(data_dir).glob(f"{split}_*.npy"))
        if not paths:
            raise LmforgeError(f"{data_dir}: no '{split}' token shards ({split}_*.npy); the corpus gave no "
                               f"{split} documents. Use a larger corpus or rebuild the shards")
        self.shards = [np.load(p, mmap_mode="r") for p in paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # start of each shard in the stream

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream, stitched across shard boundaries."""
        parts = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < end:
            shard = self.shards[k]
            lo = start - self.offsets[k]
            hi = min(end - self.offsets[k], len(shard))
            parts.append(shard[lo:hi])
            start += hi - lo
            k += 1
        return np.concatenate(parts).astype(np.int64)

    def all(self) -> np.ndarray:
        return self.read(0, len(self))


class DataLoader:
    """Random windows of seq_len + 1 tokens; a global batch is batch_size * world_size windows.

    Rank r takes windows [r * batch_size, (r + 1) * batch_size) of each global batch.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.global_batch = batch_size * world_size
        self.epoch, self.position = 0, 0  # position: windows of this epoch already handed out
        if len(stream) < (seq_len + 1) * self.global_batch + seq_len:
            raise LmforgeError(f"only {len(stream):,} training tokens: too few for batch {self.global_batch} x "
                               f"sequence {seq_len}. Use a larger corpus or smaller --batch-size/--seq-len")
        self._order_epoch = -1

    def _epoch_order(self) -> tuple[int, np.ndarray]:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            offset = int(rng.integers(self.seq_len))  # move window edges each epoch
            num_windows = (len(self.stream) - 1 - offset) // self.seq_len
            self._order = offset, rng.permutation(num_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64 on the loader's device."""
        offset, order = self._epoch_order()
        if self.position + self.global_batch > len(order):
            self.epoch, self.position = self.epoch + 1, 0
            offset, order = self._epoch_order()
        mine = order[self.position + self.rank * self.batch_size:][:self.batch_size]
        self.position += self.global_batch
        T = self.seq_len
        rows = np.stack([self.stream.read(offset + w * T, offset + w * T + T + 1) for w in mine])
        batch = torch.from_numpy(rows)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.position / max(1, len(self._epoch_order()[1]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.global_batch or state["seed"] != self.seed:
            raise LmforgeError(f"cannot resume: the checkpoint's data order used global batch "
                               f"{state['global_batch']} and seed {state['seed']}, this run {self.global_batch} "
                               f"and {self.seed}. Resume with the same --batch-size, world size and --seed")
        self.epoch, self.position = state["epoch"], state["position"]


def encode_documents(tokenizer, documents: Iterable, writers: dict[str, ShardWriter], split_of,
                     batch_docs: int = 256, num_threads: int = 1, progress=None) -> dict:
    """Tokenize documents in batches into the writer of each one's split. Returns bytes per split."""
    num_bytes = {name: 0 for name in writers}
    batch: list = []

    def flush():
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch], num_threads=num_threads)):
            split = split_of(doc)
            writers[split].add(ids)
            num_bytes[split] += len(doc.text.encode("utf-8"))
            if progress is not None:
                progress.update(len(doc.text))
        batch.clear()

    for doc in documents:
        batch.append(doc)
        if len(batch) >= batch_docs:
            flush()
    flush()
    return num_bytes
