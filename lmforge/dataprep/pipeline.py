"""The data pipeline, whole: raw inputs -> clean, filtered, deduplicated, private token shards.

    prepare(PrepareConfig(inputs=["crawl/", "more.jsonl"], out="data"))  ->  the manifest (a dict)

Stages, each a datatrove pipeline run by LocalPipelineExecutor over `tasks` shards of the input
files with `workers` processes (or by its RayPipelineExecutor on a Ray cluster, executor="ray"):
  1. filter     read (readers.py) -> HTML to text -> clean (clean.py) -> URL blocklist -> language
                (only with a model file) -> code and prose quality filters, harmful words
                (filters.py) -> PII redaction (pii.py) -> record ids and text hashes, write, MinHash
                signatures (dedup.py)
  2. buckets    MinHash LSH candidate pairs (datatrove), then find_duplicates clusters them and
                picks the survivors (smallest id) in this process
  3. split      drop duplicates -> held-out split by a hash of the document id -> drop training
                documents sharing a 13-gram with the user's eval files (decontamination)
  4. tokenizer  the given tokenizer.json, or byte-level BPE trained on the kept training documents
  5. encode     each task's documents to token ids; then one process writes the shards in document-id
                order, so the output does not depend on `tasks` or `workers` (tested)
Out: train_*.npy / val_*.npy shards in data.py's format (each document after <|bos|>), tokenizer.json,
val.txt, meta.json (what training reads), manifest.json (inputs, config, tokenizer, counts, hashes)
and data_card.md (card.py). Working files go to out/work/ and are removed at the end (keep_work
keeps them: work/kept/ holds the final documents as JSONL, work/duplicates.json maps every document
in a duplicate cluster to its survivor, work/logs/ has datatrove's logs and per-task stats).

Every document is accounted for: documents in (every record a reader saw that could be a document)
== kept + the sum of drops by reason, summed from every step's datatrove stats; prepare checks it
and refuses to write a manifest that does not add up. Bad input (binary, not UTF-8, too large,
malformed JSON, files cut short, garbled WARC) never stops a run: each is dropped, counted, and
named with its file and position, on stderr, in manifest.json ("problems") and in the data card.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupBuckets, MinhashDedupSignature
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers import JsonlWriter

from lmforge.base import LmforgeError, missing_module, sha256_file
from lmforge.corpus import HELDOUT_FRACTION, is_heldout

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

STDLIB = "stdlib"  # the built-in corpus: this Python's standard library sources and pydoc topics
SMALL_INPUT_BYTES = 8 << 20  # below this, starting worker processes (~2 s a stage) costs more than it saves


@dataclass
class PrepareConfig:
    """Every setting of a run; `lmforge data prepare --config data.toml` reads these keys (flat)."""

    inputs: list[str] = field(default_factory=lambda: [STDLIB])  # folders/files, or "stdlib"
    out: str = "data"
    text_key: str = "text"  # JSONL/Parquet field holding the text
    id_key: str = "id"  # JSONL/Parquet field holding a document id (else file:line)
    executor: str = "local"  # "local" (processes on this machine) or "ray" (a Ray cluster: RAY_ADDRESS, else local)
    workers: int = 0  # processes; 0 = every CPU, or 1 for inputs under SMALL_INPUT_BYTES
    tasks: int = 0  # input shards; 0 = as many as workers (output does not depend on either)
    max_input_bytes: int = 0  # stdlib only: read at most this many bytes of files (0 = all)
    max_document_bytes: int = 16 << 20  # a larger file, JSONL line or record is dropped (too_large), not read
    # filters
    code_filters: bool = True
    prose_filters: list[str] = field(default_factory=lambda: ["gopher_repetition", "gopher_quality", "c4",
                                                              "fineweb"])
    prose_thresholds: dict = field(default_factory=dict)  # {"gopher_quality": {"min_doc_words": 30}, ...}
    url_blocklists: list[str] = field(default_factory=list)  # files: one domain or URL per line
    word_lists: list[str] = field(default_factory=list)  # files: one word or phrase per line
    default_lists: bool = True  # also the small built-in URL and word lists
    language_model: str = ""  # a fastText language-ID model file; language filtering is off without one
    languages: list[str] = field(default_factory=lambda: ["en"])
    language_threshold: float = 0.65
    redact_pii: bool = True
    # deduplication
    exact_dedup: bool = True
    near_dedup: bool = True
    minhash_ngrams: int = 5
    minhash_bands: int = 14
    minhash_rows: int = 8
    # split and decontamination
    heldout_fraction: float = HELDOUT_FRACTION
    decontaminate: list[str] = field(default_factory=list)  # eval files (text, JSONL or Parquet)
    decontaminate_ngrams: int = 13
    # tokens
    tokenizer: str = ""  # an existing tokenizer.json; else one is trained on the kept training documents
    vocab_size: int = 8192
    tokenizer_max_bytes: int = 0  # train the tokenizer on about this many bytes (0 = all)
    keep_work: bool = False

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> PrepareConfig:
        try:
            settings = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LmforgeError(f"config {path}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise LmforgeError(f"config {path}: not valid TOML ({e})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise LmforgeError(f"config {path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        if isinstance(settings.get("inputs"), str):
            settings["inputs"] = [settings["inputs"]]
        base = Path(path).parent  # relative paths in a config are relative to the config file
        for key in ("inputs", "url_blocklists", "word_lists", "decontaminate"):
            settings[key] = [p if p == STDLIB or Path(p).is_absolute() else str(base / p)
                             for p in settings.get(key, [])] or getattr(cls(), key)
        for key in ("out", "tokenizer", "language_model"):
            if settings.get(key) and not Path(settings[key]).is_absolute():
                settings[key] = str(base / settings[key])
        defaults = cls()
        for key, value in settings.items():
            want = type(getattr(defaults, key))
            if not (isinstance(value, want) and not (want is int and isinstance(value, bool))
                    or want is float and isinstance(value, int) and not isinstance(value, bool)):
                raise LmforgeError(f"config {path}: {key} = {value!r} should be of type {want.__name__} "
                                   f"(default: {getattr(defaults, key)!r})")
        return cls(**{**settings, **{k: v for k, v in overrides.items() if v is not None}})

    def check(self) -> None:
        if not self.inputs:
            raise LmforgeError("no inputs: name folders or files (or 'stdlib') to prepare")
        for path in [*self.inputs, *self.url_blocklists, *self.word_lists, *self.decontaminate]:
            if path != STDLIB and not Path(path).exists():
                raise LmforgeError(f"{path}: no such file or folder")
        for key in ("tokenizer", "language_model"):
            if getattr(self, key) and not Path(getattr(self, key)).is_file():
                raise LmforgeError(f"{key} = {getattr(self, key)!r}: no such file")
        if not 0 < self.heldout_fraction < 1:
            raise LmforgeError(f"heldout_fraction {self.heldout_fraction}: must be between 0 and 1")
        if self.executor not in ("local", "ray"):
            raise LmforgeError(f"executor {self.executor!r}: choose 'local' or 'ray'")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:  # before any work, not after stage 1
            raise LmforgeError(missing_module("ray", "executor 'ray' (--executor ray)"))
        if self.workers < 0 or self.tasks < 0:
            raise LmforgeError("workers and tasks must be 0 (automatic) or positive")
        for path in self.decontaminate:  # read here, so a bad eval file stops the run before any work
            try:
                eval_texts(Path(path))
            except (ValueError, OSError, EOFError) as e:
                raise LmforgeError(f"decontaminate: {path}: unreadable ({e}); give text, JSONL or Parquet "
                                   "files of the eval sets") from None


# ----------------------------------------------------------------------------- steps of our own

def stdlib_files(max_bytes: int = 0) -> tuple[Path, list[Path]]:
    """This Python's standard-library .py files in path order (installed packages left out: they differ
    between machines), the first ones up to max_bytes if given; and the folder they are in."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not p.relative_to(root).as_posix().startswith(("site-packages/", "dist-packages/")))
    if max_bytes:
        sizes = np.cumsum([p.stat().st_size for p in files])
        files = files[:max(1, int(np.searchsorted(sizes, max_bytes)))]
    return root, files


class StdlibReader(PipelineStep):
    """The built-in corpus as documents: this Python's standard-library .py files (ids "stdlib/<path>",
    format "code") split across tasks by file, and the pydoc topics (ids "pydoc/<topic>", prose) on
    task 0. max_bytes keeps the first files (in path order) up to that size."""

    name = "🐍 stdlib"
    type = "📖 - READER"

    def __init__(self, max_bytes: int = 0, problems_dir: Path | None = None):
        super().__init__()
        self.max_bytes, self.problems_dir = max_bytes, problems_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from lmforge.dataprep.readers import report_problem

        root, files = stdlib_files(self.max_bytes)
        for path in files[rank::world_size]:
            self.stat_update("documents_in")
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # a few test files are deliberately in other encodings
                self.stat_update("dropped_invalid_utf8")
                report_problem(self.problems_dir, str(path), f"byte {e.start}", "invalid_utf8")
                continue
            if not text.strip():
                self.stat_update("dropped_empty")  # empty __init__.py files: normal here, not reported
                continue
            yield Document(text=text, id=f"stdlib/{path.relative_to(root).as_posix()}", metadata={"format": "code"})
        if rank == 0:
            from pydoc_data.topics import topics

            for name in sorted(topics):
                self.stat_update("documents_in")
                yield Document(text=topics[name], id=f"pydoc/{name}", metadata={"format": "text"})


class TaskReader(PipelineStep):
    """The documents one task wrote in an earlier stage (folder/{rank:05d}.jsonl), in the order written."""

    name = "📂 task documents"
    type = "📖 - READER"

    def __init__(self, folder: str | Path):
        super().__init__()
        self.folder = Path(folder)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = self.folder / f"{rank:05d}.jsonl"
        if not path.exists():  # the task had no documents
            return
        with open(path, "rb") as f:
            for line in f:
                record = json.loads(line)
                yield Document(text=record["text"], id=record["id"], metadata=record.get("metadata", {}))


def task_writer(folder: str | Path) -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None)


_WORDS = re.compile(r"\w+")


def ngram_hashes(text: str, n: int) -> set[int]:
    """Hashes of the word n-grams of text (lower case, punctuation ignored): the decontamination key."""
    words = _WORDS.findall(text.lower())
    return {int.from_bytes(hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest(), "little")
            for i in range(len(words) - n + 1)}


def eval_texts(path: Path) -> list[str]:
    """The texts of an eval file: each JSONL/Parquet record's string fields joined, else the whole file."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson", ".parquet")):
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            records = pq.read_table(path).to_pylist()
        else:
            import gzip

            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
        return ["\n".join(_strings(r)) for r in records]
    return [path.read_text(encoding="utf-8", errors="replace")]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


class SplitAndDecontaminate(BaseFilter):
    """Sets metadata["split"] ("val" for the heldout_fraction of ids by hash, else "train") and drops a
    training document sharing any word n-gram with the eval files (reason "decontaminated"; GPT-3 and
    the Llama papers used 13-grams). Held-out documents are never dropped here."""

    name = "🧪 split + decontaminate"

    def __init__(self, heldout_fraction: float, eval_files: list[str], n: int = 13):
        super().__init__()
        self.heldout_fraction, self.eval_files, self.n = heldout_fraction, list(eval_files), n
        self._eval: set[int] | None = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        doc.metadata["split"] = "val" if is_heldout(doc.id, self.heldout_fraction) else "train"
        if not self.eval_files or doc.metadata["split"] == "val":
            self.stat_update(f"split_{doc.metadata['split']}")
            return True
        if self._eval is None:  # built once per worker
            self._eval = set().union(*(ngram_hashes(t, self.n) for p in self.eval_files for t in eval_texts(Path(p))))
        if not self._eval.isdisjoint(ngram_hashes(doc.text, self.n)):
            return False, "decontaminated"
        self.stat_update("split_train")
        return True


class Encode(PipelineStep):
    """Token ids of each document (no <|bos|>), appended to folder/{rank:05d}.npy (uint32), with one index
    row per document in {rank:05d}.index.jsonl: [id, split, start, num_tokens, num_bytes, text if val]."""

    name = "🔢 encode"
    type = "🔢 - TOKENIZER"

    def __init__(self, tokenizer_file: str | Path, folder: str | Path, batch_docs: int = 256):
        super().__init__()
        self.tokenizer_file, self.folder, self.batch_docs = str(tokenizer_file), Path(folder), batch_docs

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from lmforge.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(self.tokenizer_file)
        self.folder.mkdir(parents=True, exist_ok=True)
        chunks, start, batch = [], 0, []
        with open(self.folder / f"{rank:05d}.index.jsonl", "w") as index:
            for doc in itertools.chain(data, [None]):
                if doc is not None:
                    batch.append(doc)
                if len(batch) < self.batch_docs and doc is not None:
                    continue
                with self.track_time():
                    encoded = tokenizer.encode_batch([d.text for d in batch])
                for d, ids in zip(batch, encoded):
                    split = d.metadata["split"]
                    index.write(json.dumps([d.id, split, start, len(ids), len(d.text.encode("utf-8")),
                                            d.text if split == "val" else None]) + "\n")
                    chunks.append(np.asarray(ids, dtype=np.uint32))
                    start += len(ids)
                    self.stat_update("tokens", value=len(ids))
                    yield d
                batch = []
        np.save(self.folder / f"{rank:05d}.npy", np.concatenate(chunks) if chunks else np.zeros(0, np.uint32))


# ----------------------------------------------------------------------------- assembling the stages

def filter_steps(config: PrepareConfig) -> list[PipelineStep]:
    """Stage 1's steps between the readers and the dedup bookkeeping, in order."""
    from lmforge.dataprep import filters
    from lmforge.dataprep.clean import Cleaner
    from lmforge.dataprep.pii import Redactor
    from lmforge.dataprep.readers import HtmlExtractor

    steps: list[PipelineStep] = [HtmlExtractor(), Cleaner(),
                                 filters.UrlBlocklist(config.url_blocklists, default_list=config.default_lists)]
    language = filters.language_filter(config.language_model or None, languages=config.languages,
                                       threshold=config.language_threshold)
    if language is not None:
        steps.append(language)
    if config.code_filters:
        steps.append(filters.CodeFilter())
    unknown = set(config.prose_filters) - set(filters.PROSE_FILTERS)
    if unknown:
        raise LmforgeError(f"prose_filters: no filter named {sorted(unknown)}; the names are "
                           f"{list(filters.PROSE_FILTERS)}")
    steps += filters.prose_filters(**{name: config.prose_thresholds.get(name, True) if name in config.prose_filters
                                      else False for name in filters.PROSE_FILTERS})
    steps.append(filters.WordListFilter(config.word_lists, default_list=config.default_lists))
    if config.redact_pii:
        steps.append(Redactor())
    return steps


def readers(config: PrepareConfig, problems_dir: Path) -> list[PipelineStep]:
    from lmforge.dataprep.readers import InputReader

    steps: list[PipelineStep] = []
    for path in config.inputs:
        if path == STDLIB:
            steps.append(StdlibReader(config.max_input_bytes, problems_dir))
            continue
        p = Path(path)
        # several inputs: each id starts with its input's name, so two folders' "a.txt" stay two documents
        settings = dict(id_prefix=f"{p.name}/" if len(config.inputs) > 1 else "", text_key=config.text_key,
                        id_key=config.id_key, max_document_bytes=config.max_document_bytes, problems_dir=problems_dir)
        if p.is_dir():
            steps.append(InputReader(str(p), **settings))
        else:
            steps.append(InputReader(str(p.parent), glob_pattern=p.name, **settings))
    return steps


def gather_problems(problems_dir: Path) -> list[dict]:
    """Every input the readers dropped as bad, from all workers, in file order."""
    rows = [json.loads(line) for path in problems_dir.glob("*.jsonl") for line in path.open()]
    return sorted(rows, key=lambda r: (r["file"], [int(t) if t.isdigit() else t for t in re.split(r"(\d+)",
                                                                                                r["position"])]))


def describe_inputs(config: PrepareConfig) -> list[dict]:
    from lmforge.dataprep.readers import input_kind

    out = []
    for path in config.inputs:
        p = Path(path)
        if path == STDLIB:
            p, files = stdlib_files(config.max_input_bytes)
        else:
            files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        kind = STDLIB if path == STDLIB else "folder" if p.is_dir() else input_kind(p.name)
        out.append({"path": str(p), "kind": kind,
                    "num_files": len(files), "num_bytes": sum(f.stat().st_size for f in files)})
    return out


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Every datatrove task logs each step at INFO to stderr, from its own process; the same lines go to
    its log files. Send stderr to path for the stage: file descriptor 2 for worker processes, sys.stderr
    for a task run in this one (datatrove's logger binds whatever sys.stderr is when a task starts). On a
    failure, show the log's end."""
    from datatrove.utils.logging import setup_default_logger

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
            os.dup2(log.fileno(), 2)
            yield
    except LmforgeError:
        raise  # a user's input: its message says what to fix
    except BaseException:
        os.dup2(saved, 2)
        tail = path.read_text(errors="replace").splitlines()[-30:]
        print("\n".join([f"--- the end of {path} ---", *tail]), file=sys.stderr)
        raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        setup_default_logger()  # datatrove's logger back on the real stderr, not the closed log


def _run(pipeline, *, tasks: int, workers: int, logging_dir: Path, executor: str = "local") -> list[dict]:
    """Run one stage; returns its steps' merged stats ([{name, seconds, stats: {key: number}}])."""
    with _stderr_to(logging_dir.with_suffix(".stderr.log")):
        if executor == "ray":
            _ray_executor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir).run()
        else:
            LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logging_dir),
                                  skip_completed=False).run()
    if not (logging_dir / "stats.json").exists():  # Ray reports failed tasks in its log, not by raising
        raise RuntimeError(f"a task of {logging_dir.name} failed; its log is in {logging_dir / 'logs'}")
    steps = json.loads((logging_dir / "stats.json").read_text())
    return [{"name": s["name"].split(": ", 1)[-1],
             "seconds": s["time_stats"]["total"] if isinstance(s["time_stats"], dict) else 0.0,
             "stats": {k: v["total"] if isinstance(v, dict) else v for k, v in s["stats"].items()}}
            for s in steps]


def _ray_executor(pipeline, *, tasks: int, workers: int, logging_dir: Path):
    """datatrove's Ray executor on the cluster at RAY_ADDRESS, or on a Ray started on this machine. On a
    real cluster `out` must be on a filesystem every node sees: the stages hand each other files there."""
    try:
        import ray
    except ImportError:
        raise LmforgeError(missing_module("ray", "executor 'ray' (--executor ray)")) from None
    from datatrove.executor import RayPipelineExecutor

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                               skip_completed=False, mem_per_cpu_gb=1)


def account(steps: list[dict]) -> dict:
    """Counts from the steps' stats: documents in, drops by reason, records skipped, documents modified;
    and the funnel: each step that reads or drops, with what reached it and what it dropped."""
    counts = {"documents_in": 0, "dropped": Counter(), "skipped": Counter(), "modified": Counter()}
    stages, flowing = [], 0
    for step in steps:
        stats = step["stats"]
        flowing += stats.get("documents_in", 0)  # readers add documents; every later step sees what is left
        counts["documents_in"] += stats.get("documents_in", 0)
        dropped = {k.removeprefix("dropped_"): v for k, v in stats.items() if k.startswith("dropped_") and v}
        counts["dropped"].update(dropped)
        counts["skipped"].update({k.removeprefix("skipped_"): v for k, v in stats.items() if k.startswith("skipped_")})
        counts["modified"].update({k: v for k, v in stats.items()
                                   if k.startswith(("redacted_", "repaired_", "whitespace_", "decoded_"))})
        if dropped or "documents_in" in stats:
            stages.append({"name": step["name"], "documents_in": flowing, "dropped": dropped,
                           "seconds": step["seconds"]})
            flowing -= sum(dropped.values())
    return {**{k: dict(v) if isinstance(v, Counter) else v for k, v in counts.items()}, "stages": stages}


def train_tokenizer_on(kept_dir: Path, tasks: int, config: PrepareConfig, progress: bool):
    """BPE on the kept training documents. With tokenizer_max_bytes, a hash-chosen sample of about that
    many bytes: chosen by id, not by reading order, so it is the same for any number of tasks."""
    from lmforge.tokenizer import Tokenizer

    def documents():
        for rank in range(tasks):
            yield from TaskReader(kept_dir).run(rank=rank)

    keep = 1.0
    if config.tokenizer_max_bytes:  # a first pass only to size the sample
        total = sum(len(d.text) for d in documents() if d.metadata["split"] == "train")
        keep = min(1.0, config.tokenizer_max_bytes / total)

    def texts():
        for doc in documents():
            if doc.metadata["split"] == "train" and (keep == 1.0 or is_heldout(doc.id + "#tokenizer", keep)):
                yield doc.text

    return Tokenizer.train(texts(), config.vocab_size, show_progress=progress)


def write_shards(tokens_dir: Path, out: Path, tokenizer, tasks: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Every kept document's tokens into train/val shards in document-id order; val.txt; returns the
    split counts and the per-document token counts of each split."""
    from lmforge.data import ShardWriter

    rows = []
    for rank in range(tasks):
        path = tokens_dir / f"{rank:05d}.index.jsonl"
        if path.exists():
            rows += [(json.loads(line), rank) for line in path.open()]
    rows.sort(key=lambda r: (r[0][0], r[1], r[0][2]))
    tokens = {rank: np.load(tokens_dir / f"{rank:05d}.npy", mmap_mode="r") for rank in range(tasks)
              if (tokens_dir / f"{rank:05d}.npy").exists()}
    writers = {s: ShardWriter(out, s, tokenizer.bos_id, tokenizer.vocab_size) for s in ("train", "val")}
    num_bytes, lengths, val_texts = Counter(), {"train": [], "val": []}, []
    for (_, split, start, num_tokens, size, text), rank in rows:
        writers[split].add(tokens[rank][start:start + num_tokens])
        num_bytes[split] += size
        lengths[split].append(num_tokens)
        if split == "val":
            val_texts.append(text)
    (out / "val.txt").write_bytes("".join(val_texts).encode("utf-8"))
    splits = {s: {**w.close(), "num_bytes": num_bytes[s]} for s, w in writers.items()}
    return splits, {s: np.asarray(v, dtype=np.int64) for s, v in lengths.items()}


def prepare(config: PrepareConfig, *, progress: bool = True) -> dict:
    """Run the whole pipeline into config.out; returns the manifest (also written as manifest.json)."""
    from lmforge import __version__
    from lmforge.data import write_meta
    from lmforge.dataprep.card import write_data_card
    from lmforge.dataprep.dedup import MINHASH, DropDuplicates, RecordKeys, Words, find_duplicates
    from lmforge.tokenizer import Tokenizer

    config.check()
    t_start = time.perf_counter()
    inputs = describe_inputs(config)
    small = sum(i["num_bytes"] for i in inputs) < SMALL_INPUT_BYTES
    workers = config.workers or (1 if small else os.cpu_count() or 1)
    tasks = config.tasks or workers
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)  # stale work would be mixed in (datatrove resumes by default)
    say = print if progress else (lambda *a, **k: None)
    minhash = MinhashConfig(n_grams=config.minhash_ngrams, num_buckets=config.minhash_bands,
                            hashes_per_bucket=config.minhash_rows, seed=MINHASH.seed)
    seconds = {}

    say(f"[1/5] read, clean, filter, redact: {', '.join(config.inputs)} ({tasks} tasks, {workers} workers)")
    if not config.language_model:
        say("      language ID: off (no language_model given; lmforge downloads none)")
    t0 = time.perf_counter()
    stage1 = [*readers(config, work / "problems"), *filter_steps(config), RecordKeys(work / "keys"),
              task_writer(work / "filtered")]
    if config.near_dedup:
        stage1.append(MinhashDedupSignature(str(work / "signatures"), config=minhash, language=Words()))

    def run_stage(name: str, pipeline: list, num_tasks: int = tasks) -> list[dict]:
        return _run(pipeline, tasks=num_tasks, workers=workers, logging_dir=work / "logs" / name,
                    executor=config.executor)

    steps = run_stage("filter", stage1)
    problems = gather_problems(work / "problems")
    for p in problems[:10]:  # bad input is dropped and counted, and said, whatever --quiet says
        print(f"warning: {p['file']}: {p['position']}: {p['reason']}" + (f" ({p['detail']})" if p["detail"] else ""),
              file=sys.stderr)
    if len(problems) > 10:
        print(f"warning: ... and {len(problems) - 10:,} more dropped inputs, each in {out / 'manifest.json'}",
              file=sys.stderr)
    seconds["read + filter"] = time.perf_counter() - t0

    kinds = [name for name, on in (("exact", config.exact_dedup), (f"near (MinHash {config.minhash_ngrams}-grams, "
             f"{config.minhash_bands} x {config.minhash_rows})", config.near_dedup)) if on]
    say("[2/5] duplicates: " + (", ".join(kinds) or "off"))
    t0 = time.perf_counter()
    if config.near_dedup and any((work / "signatures").rglob("*.sig")):
        run_stage("buckets", [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=minhash)],
                  minhash.num_buckets)
    survivor_of = find_duplicates(work / "keys", work / "buckets" if config.near_dedup else None, work / "remove",
                                  exact=config.exact_dedup)
    (work / "duplicates.json").write_text(json.dumps(survivor_of))
    seconds["duplicates"] = time.perf_counter() - t0

    say(f"[3/5] held-out split ({config.heldout_fraction:.0%} by id hash)"
        + (f", decontamination against {len(config.decontaminate)} eval file(s)" if config.decontaminate else ""))
    t0 = time.perf_counter()
    steps += run_stage("split", [TaskReader(work / "filtered"), DropDuplicates(work / "remove"),
                                 SplitAndDecontaminate(config.heldout_fraction, config.decontaminate,
                                                       config.decontaminate_ngrams),
                                 task_writer(work / "kept")])
    seconds["split"] = time.perf_counter() - t0
    counts = account(steps)
    if not sum(step["stats"].get("split_train", 0) for step in steps):
        drops = ", ".join(f"{n:,} {reason}" for reason, n in sorted(counts["dropped"].items()))
        raise LmforgeError(f"{', '.join(config.inputs)}: no readable documents left to train on "
                           f"({counts['documents_in']:,} in" + (f"; dropped: {drops}" if drops else "") + "); point "
                           "it at text, code, HTML, WARC, JSONL or Parquet files, or loosen the filters")
    if not sum(step["stats"].get("split_val", 0) for step in steps):
        # moving a document over would break the fixed split rule (and the comparability of evals)
        raise LmforgeError(f"{', '.join(config.inputs)}: none of the kept documents fell in the held-out split "
                           f"({config.heldout_fraction:.0%} by hash of the document id); add documents or raise "
                           "heldout_fraction")

    t0 = time.perf_counter()
    if config.tokenizer:
        say(f"[4/5] tokenizer: {config.tokenizer}")
        tokenizer = Tokenizer.load(config.tokenizer)
    else:
        say(f"[4/5] tokenizer: byte-level BPE, {config.vocab_size:,} tokens, on the kept training documents")
        tokenizer = train_tokenizer_on(work / "kept", tasks, config, progress)
    tokenizer.save(out / "tokenizer.json")
    seconds["tokenizer"] = time.perf_counter() - t0

    say("[5/5] encode -> token shards")
    t0 = time.perf_counter()
    run_stage("encode", [TaskReader(work / "kept"), Encode(out / "tokenizer.json", work / "tokens")])
    splits, lengths = write_shards(work / "tokens", out, tokenizer, tasks)
    seconds["encode"] = time.perf_counter() - t0

    kept = splits["train"]["num_documents"] + splits["val"]["num_documents"]
    if counts["documents_in"] != kept + sum(counts["dropped"].values()):  # a step dropped without a reason
        raise RuntimeError(f"document counts do not reconcile: {counts['documents_in']} in, {kept} kept, "
                           f"{sum(counts['dropped'].values())} dropped by reason; per step: {steps}")
    meta = {"corpus": ", ".join(config.inputs), "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
            "token_bytes": tokenizer.token_byte_lengths().tolist(), "splits": splits,
            "skipped": {**counts["skipped"], **{f"dropped: {k}": v for k, v in counts["dropped"].items()}},
            "tokenizer_seconds": seconds["tokenizer"], "encode_seconds": seconds["encode"], "manifest": "manifest.json"}
    write_meta(out, meta)
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".npy" or p.name in ("tokenizer.json", "val.txt"))
    manifest = {
        "created": datetime.now().isoformat(timespec="seconds"), "lmforge_version": __version__,
        "inputs": inputs, "config": asdict(config),
        "tokenizer": {"file": "tokenizer.json", "vocab_size": tokenizer.vocab_size, "trained": not config.tokenizer,
                      "sha256": sha256_file(out / "tokenizer.json")},
        "counts": {"documents_in": counts["documents_in"], "kept": kept,
                   "kept_by_split": {s: v["num_documents"] for s, v in splits.items()},
                   "dropped": counts["dropped"], "skipped": counts["skipped"], "modified": counts["modified"],
                   "duplicate_clusters": len(set(survivor_of.values()))},
        "problems": problems, "stages": counts["stages"], "splits": splits,
        "files": {name: sha256_file(out / name) for name in files},
        "seconds": time.perf_counter() - t_start, "stage_seconds": seconds, "tasks": tasks, "workers": workers,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    write_data_card(out, manifest, lengths)
    if not config.keep_work:
        shutil.rmtree(work)
    return manifest
