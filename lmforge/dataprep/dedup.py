"""Near-duplicate removal: MinHash over word 5-grams with LSH, on datatrove, the same output for any
number of workers.

    near_duplicates(docs_dir, work_dir, out_dir, tasks=4, workers=2) -> counts

Stages (datatrove's, except the third):
  1. signatures   MinhashDedupSignature per task, beside RecordKeys, which writes each document's id
                  in the order the task sees them (datatrove names documents by (task, index));
  2. buckets      MinhashDedupBuckets: in each of the 14 bands, documents whose 8 hashes all agree
                  become candidate pairs (FineWeb's 14 x 8: a pair with 5-gram Jaccard 0.75 is caught
                  with probability 1 - (1 - 0.75^8)^14 = 0.92, one at 0.8 with 0.98, at 0.5 with 0.05);
  3. clusters     `cluster` (here): union-find over the pairs; in each cluster the document with the
                  smallest id survives. datatrove's own cluster step keeps whichever member wins its
                  union-by-size merge, so which copy survives changed with the task count (measured);
  4. filter       MinhashDedupFilter drops the rest (the removed documents go to work_dir/removed/).

Text is normalised before shingling by datatrove (lower case, punctuation stripped, digits to 0),
so copies that differ only in case or numbers are duplicates too. Documents under 5 words get no
signature and are always kept. docs_dir must hold one JSONL file per task (a JsonlWriter's output
with the same `tasks`): stage 4 re-reads it and must see each task's documents in stage 1's order.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupBuckets, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
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


class RecordKeys(PipelineStep):
    """Pass documents through, writing each one's id to folder/{rank:05d}.keys in stream order."""

    name = "🔑 record ids"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        with open(Path(self.folder) / f"{rank:05d}.keys", "w") as f:
            for doc in data:
                f.write(json.dumps(doc.id) + "\n")
                yield doc


def cluster(buckets_dir: Path, keys_dir: Path, remove_dir: Path) -> dict[str, str]:
    """Union-find over the candidate pairs in buckets_dir; writes {rank:06d}.remove (ascending indices,
    MinhashDedupFilter's format) for every member but the smallest id of each cluster. Returns
    {id: the id of its cluster's survivor} for every document in a cluster."""
    keys = {int(p.stem): [json.loads(line) for line in p.open()] for p in Path(keys_dir).glob("*.keys")}
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for path in sorted(Path(buckets_dir).glob("*.dups")):
        with open(path, "rb") as f:
            for r1, d1, r2, d2 in read_tuples_from_file(f, "4I"):
                a, b = root((r1, d1)), root((r2, d2))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    members: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for node in list(parent):
        members.setdefault(root(node), []).append(node)
    survivor_of, removed = {}, {}
    for group in members.values():
        keep = min(group, key=lambda n: keys[n[0]][n[1]])
        for rank, index in group:
            survivor_of[keys[rank][index]] = keys[keep[0]][keep[1]]
            if (rank, index) != keep:
                removed.setdefault(rank, []).append(index)
    Path(remove_dir).mkdir(parents=True, exist_ok=True)
    for rank, indices in removed.items():
        (Path(remove_dir) / f"{rank:06d}.remove").write_bytes(b"".join(struct.pack("<I", i) for i in sorted(indices)))
    return survivor_of


def near_duplicates(docs_dir: str | Path, work_dir: str | Path, out_dir: str | Path, *, tasks: int = 1,
                    workers: int = 1, config: MinhashConfig = MINHASH) -> dict:
    """Drop near-duplicates from the JSONL documents in docs_dir (one file per task) into out_dir.
    Returns counts ("documents_in", "kept", "dropped_near_duplicate") and the clusters."""
    work = Path(work_dir)

    def execute(pipeline, num_tasks, name):
        LocalPipelineExecutor(pipeline, tasks=num_tasks, workers=min(workers, num_tasks),
                              logging_dir=str(work / "logs" / name), skip_completed=False).run()

    execute([JsonlReader(str(docs_dir)), RecordKeys(str(work / "keys")),
             MinhashDedupSignature(str(work / "signatures"), config=config, language=Words())], tasks, "signatures")
    execute([MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)],
            config.num_buckets, "buckets")
    survivor_of = cluster(work / "buckets", work / "keys", work / "remove")
    execute([JsonlReader(str(docs_dir)), MinhashDedupFilter(str(work / "remove"),
                                                            exclusion_writer=JsonlWriter(str(work / "removed"))),
             JsonlWriter(str(out_dir))], tasks, "filter")
    num_in = sum(1 for p in (work / "keys").glob("*.keys") for _ in p.open())
    dropped = sum(survivor != doc for doc, survivor in survivor_of.items())
    counts = Counter(documents_in=num_in, kept=num_in - dropped, dropped_near_duplicate=dropped,
                     clusters=len(set(survivor_of.values())))
    return {"counts": dict(counts), "survivor_of": survivor_of}
