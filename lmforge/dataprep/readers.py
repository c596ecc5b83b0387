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
`dropped_<reason>` for each one that is not kept, and for WARC records that are not documents at
all (requests, warcinfo, metadata) `skipped_<type>`. Bad input never stops a run and never goes
unreported: each of these is dropped, counted, and reported as a problem naming the file and the
position in it (a warning in the log, and a line in problems_dir/*.jsonl, which the pipeline
gathers into the manifest and prints):
    binary           a NUL byte in the first 8 KiB (images, archives, compiled files)
    invalid_utf8     a file or JSONL line that is not UTF-8 (position: the first bad byte)
    too_large        a document over max_document_bytes (default 16 MiB): a file, a JSONL line or a WARC
                     record (by its Content-Length) over it is not read into memory but read past a
                     MiB at a time, or seeked past in a plain file, so a 10 GB record or line, or a
                     gzip bomb, costs time but never more memory than the cap
    empty            nothing but whitespace
    bad_json         a JSONL line that does not parse as a JSON object
    no_text_field    a JSONL/Parquet record without a string text field
    truncated        a gzip stream, WARC record or Parquet file that ends early: what came before
                     it is kept, the cut record is the one document lost
    malformed_warc   bytes where a WARC record header should be, or a header over 1 MiB: skipped up to
                     the next record (a line is looked at for "WARC/" in its first 64 KiB only)
HTML responses are decoded as their Content-Type says (else UTF-8, else windows-1252, as browsers
do, counted `decoded_fallback`); a 404 or a non-HTML response is dropped by status, without a warning.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

import trafilatura
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.logging import logger

from lmforge.corpus import MAX_DOCUMENT_BYTES, SKIP_CHUNK_BYTES, read_line

HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
CODE_SUFFIXES = frozenset({".py", ".js", ".ts", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".go", ".rs", ".rb",
                           ".php", ".sh", ".sql", ".kt", ".swift", ".scala", ".cs", ".lua", ".r", ".jl"})
MAX_WARC_HEADER_BYTES = 1 << 20  # one record's header lines together; real ones are a few hundred bytes to a few KiB
_MAX_LINE_BYTES = 64 << 10  # a line between records is looked at for "WARC/" up to here; longer ones are garbage
_DECOMPRESSING = (gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile)  # seekable, but a seek reads (8 KiB at a time)


def decode_html(raw: bytes, step, charset: str = "utf-8") -> str:
    """An HTML body: its declared charset, else windows-1252 (what browsers assume of an undeclared or
    wrongly declared page; latin-1 for the few bytes cp1252 leaves undefined), counted."""
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        step.stat_update("decoded_fallback")
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class WarcRecord(NamedTuple):
    offset: int  # in the uncompressed stream
    headers: dict[str, str]
    block: bytes
    problem: str | None = None  # "malformed_warc", "too_large" or "truncated": headers/block say what was there


def _skip(stream: BinaryIO, num_bytes: int) -> int:
    """Move num_bytes on without keeping them: a seek in a plain file, else reads of a MiB at a time (through
    a decompressor, whose own seek reads too, in 8 KiB steps). The bytes skipped: fewer at the end."""
    if stream.seekable() and not isinstance(stream, _DECOMPRESSING):
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        return stream.seek(min(here + num_bytes, end)) - here
    left = num_bytes
    while left:
        piece = stream.read(min(left, SKIP_CHUNK_BYTES))
        if not piece:
            break
        left -= len(piece)
    return num_bytes - left


def warc_records(stream: BinaryIO, max_block_bytes: int = MAX_DOCUMENT_BYTES) -> Iterator[WarcRecord]:
    """Each record of an uncompressed WARC stream (a gzip one is opened as one stream: Python's gzip reads
    the member-per-record files Common Crawl writes). Bytes that are not a record header, or a header over
    MAX_WARC_HEADER_BYTES, are reported once (problem "malformed_warc") and skipped up to the next "WARC/"
    line; a record whose Content-Length is over max_block_bytes is skipped without being read (problem
    "too_large", empty block); a stream that ends inside a record, or a gzip stream cut short, ends with
    one record whose problem is "truncated" (or "too_large", for one that was not going to be read)."""
    offset = 0

    def next_line(limit: int = _MAX_LINE_BYTES) -> tuple[int, bytes | None]:
        """(where the line starts, the line): b"" at the end, None for a line over limit (read past)."""
        nonlocal offset
        start = offset
        line, length = read_line(stream, limit)
        offset += length
        return start, line

    def skip_to_next_header() -> tuple[int, bytes]:
        while True:
            start, line = next_line()
            if line is not None and (not line or line.startswith(b"WARC/")):
                return start, line

    try:
        start, line = next_line()
        while line != b"":
            if line is not None and not line.strip():  # the blank lines that end the previous record
                start, line = next_line()
                continue
            if line is None or not line.startswith(b"WARC/"):
                yield WarcRecord(start, {}, b"", "malformed_warc")
                start, line = skip_to_next_header()
                continue
            headers, header_bytes = {}, 0
            while True:
                _, header = next_line(MAX_WARC_HEADER_BYTES - header_bytes)
                if header is None or header == b"" or not header.strip():
                    break
                header_bytes += len(header)
                key, _, value = header.decode("utf-8", "replace").partition(":")
                headers[key.strip().lower()] = value.strip()
            if header == b"":
                yield WarcRecord(start, headers, b"", "truncated")
                return
            length = headers.get("content-length", "0")
            if header is None or not (length.isascii() and length.isdigit()):
                yield WarcRecord(start, headers, b"", "malformed_warc")
                start, line = skip_to_next_header()
                continue
            length = int(length)
            if length > max_block_bytes:
                skipped = _skip(stream, length)
                offset += skipped
                yield WarcRecord(start, headers, b"", "too_large")
                if skipped < length:
                    return
            else:
                block = stream.read(length)
                offset += len(block)
                if len(block) < length:
                    yield WarcRecord(start, headers, block, "truncated")
                    return
                yield WarcRecord(start, headers, block)
            start, line = next_line()
    except (EOFError, zlib.error, gzip.BadGzipFile):  # a gzip stream cut short or damaged
        yield WarcRecord(offset, {}, b"", "truncated")


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

    def __init__(self, data_folder, glob_pattern: str | None = None, *, id_prefix: str = "",
                 max_document_bytes: int = MAX_DOCUMENT_BYTES, problems_dir: str | Path | None = None, **kwargs):
        super().__init__(data_folder, glob_pattern=glob_pattern, **kwargs)
        self.id_prefix, self.max_document_bytes = id_prefix, max_document_bytes
        self.problems_dir = Path(problems_dir) if problems_dir else None

    def read_file(self, filepath: str) -> DocumentsPipeline:
        kind = self.only_kind or input_kind(filepath)
        read = {"warc": self.read_warc, "jsonl": self.read_jsonl, "parquet": self.read_parquet}.get(kind, self.read_one)
        yield from read(filepath)

    def drop(self, filepath: str, position: str, reason: str, detail: str = "") -> None:
        """Count one input as dropped for reason, and report it: a log warning and a problems file line."""
        self.stat_update(f"dropped_{reason}")
        report_problem(self.problems_dir, self.data_folder.resolve_paths(filepath), position, reason, detail)

    def _document(self, text: str, doc_id: str, filepath: str, index: int, position: str,
                  **metadata) -> Document | None:
        if not text.strip():
            self.drop(filepath, position, "empty")
            return None
        return self.get_document_from_dict({"text": text, "id": self.id_prefix + doc_id, **metadata}, filepath, index)

    def read_one(self, filepath: str) -> DocumentsPipeline:
        """The whole file as one document; metadata["format"] is "html", "code" or "text" by suffix."""
        self.stat_update("documents_in")
        size = self.data_folder.size(filepath)
        if size > self.max_document_bytes:  # not even read
            self.drop(filepath, "whole file", "too_large", f"{size:,} bytes > {self.max_document_bytes:,}")
            return
        with self.data_folder.open(filepath, "rb") as f:  # no further than the cap, whatever size was reported
            raw = f.read(self.max_document_bytes + 1)
        if len(raw) > self.max_document_bytes:  # it grew since it was listed, or its file system says 0 (procfs)
            self.drop(filepath, "whole file", "too_large", f"over {self.max_document_bytes:,} bytes, "
                      f"though its size was given as {size:,}")
            return
        if b"\x00" in raw[:8192]:  # images, archives, compiled files: no text to read
            self.drop(filepath, f"byte {raw.index(0)}", "binary")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.drop(filepath, f"byte {e.start}", "invalid_utf8", repr(raw[e.start:e.start + 4]))
            return
        suffix = PurePosixPath(filepath).suffix.lower()
        kind = "html" if suffix in HTML_SUFFIXES else "code" if suffix in CODE_SUFFIXES else "text"
        document = self._document(text, filepath, filepath, 0, "whole file", format=kind)
        if document:
            yield document

    def _record(self, record, filepath: str, index: int, position: str) -> Document | None:
        """One JSONL/Parquet record (already parsed) as a prose document, or a counted drop."""
        if not isinstance(record, dict):
            self.drop(filepath, position, "bad_json", "not a JSON object")
            return None
        text = record.get(self.text_key)
        if not isinstance(text, str):
            self.drop(filepath, position, "no_text_field", f"no string {self.text_key!r} field")
            return None
        doc_id = record.get(self.id_key)
        doc_id = str(doc_id) if doc_id is not None else f"{filepath}:{position.split()[-1]}"  # path:line, path:row
        extra = {k: record[k] for k in ("url", "date") if isinstance(record.get(k), str)}
        return self._document(text, doc_id, filepath, index, position, format="text", **extra)

    def read_jsonl(self, filepath: str) -> DocumentsPipeline:
        line_no = 0
        with self.data_folder.open(filepath, "rb", compression="infer") as f:
            try:
                while True:
                    line, length = read_line(f, self.max_document_bytes)  # a longer line is read past, not held
                    if not length:
                        break
                    line_no += 1
                    if line is not None and not line.strip():
                        continue
                    self.stat_update("documents_in")
                    where = f"line {line_no}"
                    if line is None:
                        self.drop(filepath, where, "too_large", f"{length:,} bytes > {self.max_document_bytes:,}")
                        continue
                    try:
                        record = json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        self.drop(filepath, f"{where}, byte {e.start}", "invalid_utf8")
                        continue
                    except ValueError as e:
                        self.drop(filepath, where, "bad_json", str(e))
                        continue
                    document = self._record(record, filepath, line_no, where)
                    if document:
                        yield document
            except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:  # a .gz cut short: the lines before stay
                self.stat_update("documents_in")
                self.drop(filepath, f"line {line_no + 1}", "truncated", str(e))

    def read_parquet(self, filepath: str) -> DocumentsPipeline:
        import pyarrow as pa
        import pyarrow.parquet as pq

        row = 0
        try:
            with self.data_folder.open(filepath, "rb") as f, pq.ParquetFile(f) as table:
                for batch in table.iter_batches(batch_size=1000):
                    for record in batch.to_pylist():
                        self.stat_update("documents_in")
                        document = self._record(record, filepath, row, f"row {row}")
                        row += 1
                        if document:
                            yield document
        except (pa.ArrowException, OSError) as e:  # damaged or cut short: the rows before stay
            self.stat_update("documents_in")
            self.drop(filepath, f"row {row}", "truncated", str(e))

    def read_warc(self, filepath: str) -> DocumentsPipeline:
        """HTML responses of WARC files (format "html", for HtmlExtractor) and text conversions of WET
        files (format "text"); the id is the record's target URI, also metadata["url"]."""
        with self.data_folder.open(filepath, "rb") as raw:
            stream = gzip.open(raw) if filepath.endswith(".gz") else raw
            for index, record in enumerate(warc_records(stream, self.max_document_bytes)):
                headers, where = record.headers, f"record {index} (byte {record.offset:,} uncompressed)"
                kind = headers.get("warc-type", "unknown")
                if record.problem:
                    self.stat_update("documents_in")
                    self.drop(filepath, where, record.problem, f"Content-Length {int(headers['content-length']):,} "
                              f"> {self.max_document_bytes:,}" if record.problem == "too_large" else "")
                    continue
                url = headers.get("warc-target-uri", f"{filepath}#{index}")
                if kind == "conversion":
                    self.stat_update("documents_in")
                    try:
                        text, fmt = record.block.decode("utf-8"), "text"
                    except UnicodeDecodeError as e:
                        self.drop(filepath, f"{where}, byte {e.start} of the block", "invalid_utf8")
                        continue
                elif kind == "response":
                    self.stat_update("documents_in")
                    status, http, body = _http_parts(record.block)
                    content_type = http.get("content-type", "").lower()
                    if status != 200:
                        self.stat_update("dropped_http_status_not_200")
                        continue
                    if "html" not in content_type:
                        self.stat_update("dropped_not_html")
                        continue
                    charset = content_type.partition("charset=")[2].split(";")[0].strip() or "utf-8"
                    text, fmt = decode_html(body, self, charset), "html"
                else:
                    self.stat_update(f"skipped_{kind}")  # requests, warcinfo, metadata: not documents
                    continue
                document = self._document(text, url, filepath, index, where, format=fmt, url=url,
                                          date=headers.get("warc-date"))
                if document:
                    yield document


def report_problem(problems_dir: Path | None, path: str, position: str, reason: str, detail: str = "") -> None:
    """A dropped input, named: a warning in the task's log and, with problems_dir, a JSON line in
    problems_dir/<pid>.jsonl for the pipeline to gather (workers are separate processes)."""
    logger.warning(f"{path}: {position}: {reason}" + (f" ({detail})" if detail else ""))
    if problems_dir is not None:
        problems_dir.mkdir(parents=True, exist_ok=True)
        with open(problems_dir / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"file": path, "position": position, "reason": reason, "detail": detail[:200]}) + "\n")


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
