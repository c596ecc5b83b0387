"""Corpus readers: the embedded default corpus and simple user corpora, with a held-out split.

The default corpus is already on every machine: the running interpreter's standard-library
`.py` sources (tests included, ~30 MB of real Python) plus the `pydoc_data` topics (English
reference text). A user corpus is a folder of text files, a single text file, or JSONL with a
"text" field. A file or JSONL line over `max_document_bytes` (16 MiB) is skipped as "too large"
without being read into memory, so a .jsonl.gz bomb stays bounded too. Every document gets a
stable id; the held-out split is a hash of that id, so it never changes between runs or machines
and never depends on reading order.

This is the simple reader the foundation needs. The data-preparation pipeline (cleaning,
deduplication, redaction) replaces it by producing the same thing: an iterator of `Document`s
and a count for every input skipped, by reason.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lmforge.base import LmforgeError

DEFAULT_CORPUS = "stdlib"
HELDOUT_FRACTION = 0.02
MAX_DOCUMENT_BYTES = 16 << 20  # a larger file or JSONL line is skipped ("too large") without being read
SKIP_CHUNK_BYTES = 1 << 20  # what is held at once while reading past something over a cap
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".html", ".htm", ".csv", ".tex", ".c", ".h", ".cpp",
                 ".js", ".ts", ".rs", ".go", ".java", ".sh", ".toml", ".yaml", ".yml", ".ini", ".cfg", ""}


def read_line(f: BinaryIO, max_bytes: int) -> tuple[bytes | None, int]:
    """The next line of binary file f and its length in bytes, newline included; (b"", 0) at the end. A line
    over max_bytes is read past a MiB at a time and never held whole: (None, its length). `for line in f`
    would hold a 10 GB line, or a gzip bomb with no newline in it, whole."""
    line = f.readline(max_bytes + 1)
    if len(line) <= max_bytes:
        return line, len(line)
    length = len(line)
    while not line.endswith(b"\n"):
        line = f.readline(SKIP_CHUNK_BYTES)
        if not line:
            break
        length += len(line)
    return None, length


@dataclass(frozen=True)
class Document:
    id: str  # stable: path relative to the corpus root, or "file.jsonl:LINE"
    text: str


def is_heldout(doc_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Deterministic split: the first 8 bytes of sha256(id) as a number in [0, 1)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


@dataclass
class Corpus:
    """A source of documents. `skipped` counts every input not turned into a document, by reason."""

    source: str = DEFAULT_CORPUS
    max_bytes: int | None = None  # stop after this many bytes of text (the --tiny preset uses it)
    max_document_bytes: int = MAX_DOCUMENT_BYTES  # a larger file or JSONL line is skipped unread ("too large")
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.source != DEFAULT_CORPUS and not Path(self.source).exists():
            raise LmforgeError(f"corpus {self.source!r} does not exist; pass a folder of text files, a .txt or "
                               f".jsonl file, or '{DEFAULT_CORPUS}' for the built-in corpus")

    def documents(self, split: str | None = None) -> Iterator[Document]:
        """All documents in a fixed order; split='train' or 'val' keeps one side of the hash split."""
        self.skipped.clear()
        num_bytes = 0
        for doc in self._read():
            if split is not None and is_heldout(doc.id) != (split == "val"):
                continue
            yield doc
            num_bytes += len(doc.text)
            if self.max_bytes is not None and num_bytes >= self.max_bytes:
                return

    def _read(self) -> Iterator[Document]:
        if self.source == DEFAULT_CORPUS:
            yield from self._read_default()
            return
        path = Path(self.source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            for p in files:
                yield from self._read_file(p, p.relative_to(path).as_posix())
        else:
            yield from self._read_file(path, path.name)

    def _read_default(self) -> Iterator[Document]:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for p in sorted(stdlib.rglob("*.py")):
            rel = p.relative_to(stdlib).as_posix()
            if rel.startswith(("site-packages/", "dist-packages/")):
                continue  # installed third-party packages differ between machines
            yield from self._read_file(p, f"stdlib/{rel}")
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield Document(f"pydoc/{name}", topics[name])

    def _read_file(self, path: Path, doc_id: str) -> Iterator[Document]:
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            yield from self._read_jsonl(path, doc_id)
            return
        if path.suffix.lower() not in TEXT_SUFFIXES:
            self.skipped["not a text file type"] += 1
            return
        try:
            with open(path, "rb") as f:  # no further than the cap, whatever size the file claimed or grew to
                raw = f.read(self.max_document_bytes + 1) if path.stat().st_size <= self.max_document_bytes else None
        except OSError:
            self.skipped["unreadable"] += 1
            return
        if raw is None or len(raw) > self.max_document_bytes:
            self.skipped["too large"] += 1
            return
        text = self._decode(raw)
        if text is not None:
            yield Document(doc_id, text)

    def _decode(self, raw: bytes) -> str | None:
        if b"\x00" in raw[:8192]:
            self.skipped["binary"] += 1
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped["invalid utf-8"] += 1
            return None
        if not text.strip():
            self.skipped["empty"] += 1
            return None
        return text

    def _read_jsonl(self, path: Path, doc_id: str) -> Iterator[Document]:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                line_no = 0
                while True:
                    line, length = read_line(f, self.max_document_bytes)
                    if not length:
                        break
                    line_no += 1
                    if line is None:
                        self.skipped["too large"] += 1
                        continue
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        text = record["text"]
                    except (ValueError, KeyError, TypeError):
                        self.skipped["malformed jsonl line"] += 1
                        continue
                    if not isinstance(text, str) or not text.strip():
                        self.skipped["empty"] += 1
                        continue
                    yield Document(f"{doc_id}:{line_no}", text)
        except (OSError, EOFError):
            self.skipped["unreadable"] += 1


def describe_skipped(skipped: Counter) -> str:
    """'3 binary, 1 invalid utf-8' or '' when nothing was skipped."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
