"""Inputs of the data pipeline as datatrove steps, every record accounted for.

    InputReader(folder)      every file under folder, each read by its suffix as one of these:
    TextFileReader(folder)   each file one document: text, code or HTML (format from its suffix)
    WarcReader(folder)       WARC (HTML responses) and WET (text conversions) archives, .warc(.gz)/.wet(.gz)
    JSONL / Parquet          one document per record with a text field (.jsonl, .jsonl.gz, .parquet)
    HtmlExtractor()          HTML -> the page's main text (trafilatura), boilerplate gone

datatrove has readers for all of these, but they skip what they cannot read without a count (a
malformed JSON line or an empty text is a log line; its WarcReader skips records silently and
needs libmagic), and its extractor runs trafilatura in a child with a 1 s timeout, counts a crash
as a timeout rather than a drop, and keeps a per-process dedup cache that makes output depend on
what a worker saw before. Files are the unit of work: datatrove hands each task whole files, so
one big archive is read by one worker (split large inputs into several files to read in parallel).

Counting, in the step's datatrove stats: `documents_in` for every record that could be a document,
`dropped_<reason>` for each one that is not kept (binary, empty, bad_json, no_text_field,
http_status_not_200, not_html), and for WARC records that are not documents at all (requests,
warcinfo, metadata) `skipped_<type>`. Bytes that are not UTF-8 are read as Latin-1
(counted as `decoded_latin1`) rather than dropped: the cleaning step repairs mojibake.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import BinaryIO

import trafilatura
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader

from lmforge.base import LmforgeError

HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
CODE_SUFFIXES = frozenset({".py", ".js", ".ts", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".go", ".rs", ".rb",
                           ".php", ".sh", ".sql", ".kt", ".swift", ".scala", ".cs", ".lua", ".r", ".jl"})


def decode(raw: bytes, step, charset: str = "utf-8") -> str:
    """Text of some bytes: the declared charset (UTF-8 by default), else Latin-1, which cannot fail."""
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        step.stat_update("decoded_latin1")
        return raw.decode("latin-1")


def warc_records(stream: BinaryIO) -> Iterator[tuple[dict[str, str], bytes]]:
    """(headers, block) of each record in an uncompressed WARC stream (a gzip one is opened as one stream:
    Python's gzip reads the member-per-record files Common Crawl writes)."""
    while True:
        line = stream.readline()
        if not line:
            return
        if not line.strip():
            continue  # the blank lines that end the previous record
        if not line.startswith(b"WARC/"):
            raise ValueError(f"not a WARC record header: {line[:40]!r}")
        headers = {}
        for line in iter(stream.readline, b""):
            if not line.strip():
                break
            key, _, value = line.decode("utf-8", "replace").partition(":")
            headers[key.strip().lower()] = value.strip()
        block = stream.read(int(headers.get("content-length", 0)))
        yield headers, block


def _http_parts(block: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = block.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, headers, body


def input_kind(path: str) -> str:
    """"warc", "jsonl", "parquet" or "file" (one document per file), from the file name."""
    name = path.lower().removesuffix(".gz")
    if name.endswith((".warc", ".wet", ".arc")):
        return "warc"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "file"


class InputReader(BaseDiskReader):
    """Every file under data_folder (or the files glob_pattern names), each read by its kind (input_kind).
    Document ids: a file's path relative to data_folder; a record's URL (WARC); a JSONL/Parquet record's
    id_key field, else "path:line" / "path:row". id_prefix goes before every id, so several inputs
    of one run cannot collide."""

    name = "📥 inputs"

    only_kind: str | None = None  # set by subclasses that read every file as one kind

    def __init__(self, data_folder, glob_pattern: str | None = None, *, id_prefix: str = "", **kwargs):
        super().__init__(data_folder, glob_pattern=glob_pattern, **kwargs)
        self.id_prefix = id_prefix

    def read_file(self, filepath: str) -> DocumentsPipeline:
        kind = self.only_kind or input_kind(filepath)
        read = {"warc": self.read_warc, "jsonl": self.read_jsonl, "parquet": self.read_parquet}.get(kind, self.read_one)
        try:
            yield from read(filepath)
        except (OSError, EOFError, ValueError, zlib.error) as e:
            # A damaged file (cut short, not what its name says): stop with its name rather than keep
            # part of it or skip the rest uncounted. Malformed JSON lines are counted, not raised.
            raise LmforgeError(f"{self.data_folder.resolve_paths(filepath)}: unreadable as {kind} ({e}); the file is "
                               "damaged or not what its name says: replace it, or move it out of the inputs") from None

    def _document(self, text: str, doc_id: str, filepath: str, index: int, **metadata) -> Document | None:
        if not text.strip():
            self.stat_update("dropped_empty")
            return None
        return self.get_document_from_dict({"text": text, "id": self.id_prefix + doc_id, **metadata}, filepath, index)

    def read_one(self, filepath: str) -> DocumentsPipeline:
        """The whole file as one document; metadata["format"] is "html", "code" or "text" by suffix."""
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read()
        self.stat_update("documents_in")
        if b"\x00" in raw[:8192]:  # images, archives, compiled files: no text to read
            self.stat_update("dropped_binary")
            return
        suffix = PurePosixPath(filepath).suffix.lower()
        kind = "html" if suffix in HTML_SUFFIXES else "code" if suffix in CODE_SUFFIXES else "text"
        document = self._document(decode(raw, self), filepath, filepath, 0, format=kind)
        if document:
            yield document

    def _record(self, record, filepath: str, index: int, where: str) -> Document | None:
        """One JSONL/Parquet record (already parsed) as a prose document, or a counted drop."""
        self.stat_update("documents_in")
        if not isinstance(record, dict):
            self.stat_update("dropped_bad_json")
            return None
        text = record.get(self.text_key)
        if not isinstance(text, str):
            self.stat_update("dropped_no_text_field")
            return None
        doc_id = record.get(self.id_key)
        doc_id = str(doc_id) if doc_id is not None else f"{filepath}:{where}"
        extra = {k: record[k] for k in ("url", "date") if isinstance(record.get(k), str)}
        return self._document(text, doc_id, filepath, index, format="text", **extra)

    def read_jsonl(self, filepath: str) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rb", compression="infer") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    self.stat_update("documents_in")
                    self.stat_update("dropped_bad_json")
                    continue
                document = self._record(record, filepath, line_no, str(line_no))
                if document:
                    yield document

    def read_parquet(self, filepath: str) -> DocumentsPipeline:
        import pyarrow.parquet as pq

        with self.data_folder.open(filepath, "rb") as f, pq.ParquetFile(f) as table:
            row = 0
            for batch in table.iter_batches(batch_size=1000):
                for record in batch.to_pylist():
                    document = self._record(record, filepath, row, str(row))
                    row += 1
                    if document:
                        yield document

    def read_warc(self, filepath: str) -> DocumentsPipeline:
        """HTML responses of WARC files (format "html", for HtmlExtractor) and text conversions of WET
        files (format "text"); the id is the record's target URI, also metadata["url"]."""
        with self.data_folder.open(filepath, "rb") as raw:
            stream = gzip.open(raw) if filepath.endswith(".gz") else raw
            for index, (headers, block) in enumerate(warc_records(stream)):
                kind = headers.get("warc-type", "unknown")
                url = headers.get("warc-target-uri", f"{filepath}#{index}")
                if kind == "conversion":
                    self.stat_update("documents_in")
                    text, fmt = decode(block, self), "text"
                elif kind == "response":
                    self.stat_update("documents_in")
                    status, http, body = _http_parts(block)
                    content_type = http.get("content-type", "").lower()
                    if status != 200:
                        self.stat_update("dropped_http_status_not_200")
                        continue
                    if "html" not in content_type:
                        self.stat_update("dropped_not_html")
                        continue
                    charset = content_type.partition("charset=")[2].split(";")[0].strip() or "utf-8"
                    text, fmt = decode(body, self, charset), "html"
                else:
                    self.stat_update(f"skipped_{kind}")  # requests, warcinfo, metadata: not documents
                    continue
                document = self._document(text, url, filepath, index, format=fmt, url=url,
                                          date=headers.get("warc-date"))
                if document:
                    yield document


class TextFileReader(InputReader):
    """Each file under data_folder as one document, whatever its suffix."""

    name = "📄 text files"
    only_kind = "file"


class WarcReader(InputReader):
    """The WARC and WET archives under data_folder (.warc, .wet, gzipped or not)."""

    name = "🕷 WARC"

    only_kind = "warc"

    def __init__(self, data_folder, glob_pattern: str | None = "*.w[ae][rt]*", **kwargs):
        super().__init__(data_folder, glob_pattern=glob_pattern, **kwargs)


class HtmlExtractor(BaseFilter):
    """HTML documents -> their main text (trafilatura, precision-leaning, no comments, no cross-document
    dedup cache); other documents pass as they are. A page with no main text is dropped as html_no_text."""

    name = "⛏ HTML to text"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("format") != "html":
            return True
        try:
            text = trafilatura.extract(doc.text, favor_precision=True, include_comments=False, include_tables=True,
                                       deduplicate=False)
        except Exception:  # a parser failure on one page must not stop the pipeline; it is counted
            return False, "html_extract_error"
        if not text or not text.strip():
            return False, "html_no_text"
        doc.text = text
        doc.metadata["format"] = "text"
        return True
