"""Inputs of the data pipeline as datatrove steps, every record accounted for.

    TextFileReader(folder)   each file one document: text, code or HTML (format from its suffix)
    WarcReader(folder)       WARC (HTML responses) and WET (text conversions) archives, .warc(.gz)/.wet(.gz)
    HtmlExtractor()          HTML -> the page's main text (trafilatura), boilerplate gone

datatrove's JsonlReader/ParquetReader serve JSONL and Parquet; these cover what it lacks or does
silently (its WarcReader skips records without a count and needs libmagic; its extractor runs
trafilatura in a child with a 1 s timeout, counts a crash as a timeout rather than a drop, and
keeps a per-process dedup cache that makes output depend on what a worker saw before).

Counting, in the step's datatrove stats: `documents_in` for every record that could be a document,
`dropped_<reason>` for each one that is not kept, and for WARC records that are not documents at
all (requests, warcinfo, metadata) `skipped_<type>`. Bytes that are not UTF-8 are read as Latin-1
(counted as `decoded_latin1`) rather than dropped: the cleaning step repairs mojibake.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import BinaryIO

import trafilatura
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader

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


class TextFileReader(BaseDiskReader):
    """Each file under data_folder (default glob: every file) as one document, its id the relative path;
    metadata["format"] is "html", "code" or "text" by suffix."""

    name = "📄 text files"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read()
        self.stat_update("documents_in")
        text = decode(raw, self)
        if not text.strip():
            self.stat_update("dropped_empty")
            return
        suffix = PurePosixPath(filepath).suffix.lower()
        kind = "html" if suffix in HTML_SUFFIXES else "code" if suffix in CODE_SUFFIXES else "text"
        document = self.get_document_from_dict({"text": text, "id": filepath, "format": kind}, filepath, 0)
        if document:
            yield document


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


class WarcReader(BaseDiskReader):
    """HTML responses of WARC files (metadata format "html", for HtmlExtractor) and text conversions of
    WET files (format "text"); the document id is the record's target URI, metadata["url"] too."""

    name = "🕷 WARC"

    def __init__(self, data_folder, glob_pattern: str | None = "*.w[ae][rt]*", **kwargs):
        super().__init__(data_folder, glob_pattern=glob_pattern, **kwargs)

    def read_file(self, filepath: str) -> DocumentsPipeline:
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
                if not text.strip():
                    self.stat_update("dropped_empty")
                    continue
                document = self.get_document_from_dict(
                    {"text": text, "id": url, "format": fmt, "url": url, "date": headers.get("warc-date")},
                    filepath, index)
                if document:
                    yield document


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
