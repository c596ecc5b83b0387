"""Duplicate removal, exact and near, on datatrove, with the same survivors for any number of workers.

Pieces the pipeline (pipeline.py) puts in place:
  RecordKeys      stage 1, beside MinhashDedupSignature: writes each document's id and the hash of its
                  normalised text (`text_hash`: case folded, whitespace collapsed), in the order the task
                  sees them (datatrove names documents by (task, index));
  MinhashDedupSignature + MinhashDedupBuckets (datatrove's): MinHash over word 5-grams; in each of the
                  14 bands, documents whose 8 hashes all agree become candidate pairs (FineWeb's 14 x 8:
                  a pair with 5-gram Jaccard 0.75 is caught with probability 1 - (1 - 0.75^8)^14 = 0.92,
                  one at 0.8 with 0.98, at 0.5 with 0.05);
  find_duplicates union-find over those pairs and over equal text hashes; in each cluster the document
                  with the smallest id survives. datatrove's own cluster step keeps whichever member wins
                  its union-by-size merge, so which copy survived changed with the task count (measured);
  DropDuplicates  stage 2: drops the rest, each as exact_duplicate (the same normalised text as a
                  document with a smaller id) or near_duplicate.

MinHash normalises text before shingling (lower case, punctuation stripped, digits to 0), so copies
that differ only in case or numbers are near duplicates. Documents under 5 words get no signature;
only the exact hash can remove them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashConfig
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.word_tokenizers import WordTokenizer

MINHASH = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)  # FineWeb's

_WORD = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"')\]]*|\n|$)")


class Words(WordTokenizer):
    """Words and punctuation by a regex: datatrove's default for English is spaCy's blank model, which
    would make spaCy (17 packages) a dependency for word splitting alone. Importable, so it pickles
    to workers."""

    def __init__(self):
        super().__init__("regex")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _SENTENCE.finditer(text) if m.group().strip()]


def text_hash(text: str) -> str:
    """The exact-duplicate key: case and whitespace do not make two documents different."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode("utf-8"), digest_size=12).hexdigest()


class RecordKeys(PipelineStep):
    """Pass documents through, writing [id, text_hash] of each to folder/{rank:05d}.keys in stream order."""

    name = "🔑 record ids"

    def __init__(self, folder: str | Path):
        super().__init__()
        self.folder = Path(folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{rank:05d}.keys", "w") as f:
            for doc in data:
                f.write(json.dumps([doc.id, text_hash(doc.text)]) + "\n")
                yield doc


def find_duplicates(keys_dir: Path, buckets_dir: Path | None, remove_dir: Path, *, exact: bool = True) -> dict:
    """Clusters of duplicates from MinHash candidate pairs (buckets_dir/*.dups; None for exact only) and
    equal text hashes (exact=True). Writes remove_dir/{rank:05d}.json ({index: reason} for DropDuplicates)
    and returns {id: its cluster's survivor} for every document in a cluster of two or more."""
    keys = {int(p.stem): [tuple(json.loads(line)) for line in p.open()] for p in Path(keys_dir).glob("*.keys")}
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    def union(a, b):
        a, b = root(a), root(b)
        if a != b:
            parent[max(a, b)] = min(a, b)

    for path in sorted(Path(buckets_dir).glob("*.dups")) if buckets_dir else ():
        with open(path, "rb") as f:
            for r1, d1, r2, d2 in read_tuples_from_file(f, "4I"):
                union((r1, d1), (r2, d2))
    if exact:
        first_with_hash: dict[str, tuple[int, int]] = {}
        for rank, rows in keys.items():
            for index, (_, digest) in enumerate(rows):
                union(first_with_hash.setdefault(digest, (rank, index)), (rank, index))
    members: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for node in list(parent):
        members.setdefault(root(node), []).append(node)
    survivor_of, removed = {}, {}
    for group in members.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda n: (keys[n[0]][n[1]][0], n))  # by id; equal ids (a re-crawled URL) by position
        smallest_with_hash = {}
        for rank, index in group:
            doc_id, digest = keys[rank][index]
            survivor_of[doc_id] = keys[group[0][0]][group[0][1]][0]
            if (rank, index) != group[0]:
                removed.setdefault(rank, {})[index] = ("exact_duplicate" if digest in smallest_with_hash
                                                       else "near_duplicate")
            smallest_with_hash.setdefault(digest, doc_id)
    Path(remove_dir).mkdir(parents=True, exist_ok=True)
    for rank, reasons in removed.items():
        (Path(remove_dir) / f"{rank:05d}.json").write_text(json.dumps(reasons))
    return survivor_of


class DropDuplicates(BaseFilter):
    """Stage 2: drop the documents find_duplicates listed for this task, by their position in its stream
    (so it must read the task's documents in stage 1's order)."""

    name = "🫂 drop duplicates"

    def __init__(self, remove_dir: str | Path):
        super().__init__()
        self.remove_dir = Path(remove_dir)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = self.remove_dir / f"{rank:05d}.json"
        self._reasons = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
        self._index = -1
        yield from super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        self._index += 1
        reason = self._reasons.get(self._index)
        return (False, reason) if reason else True
