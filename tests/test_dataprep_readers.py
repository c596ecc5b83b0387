"""Pipeline inputs: the synthetic crawl read from HTML files and a WARC, main text extracted, the same
with 1 or 2 workers; WARC/WET and file edge cases each counted by reason."""

import gzip
import json
import os
import tracemalloc
import zlib

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.writers import JsonlWriter

from lmforge.dataprep.readers import HtmlExtractor, InputReader, TextFileReader, WarcReader
from lmforge.dataprep.synthetic import make_web_corpus, warc_record


def run(pipeline, tmp_path, name, tasks=1):
    out = tmp_path / name
    LocalPipelineExecutor([*pipeline, JsonlWriter(str(out / "docs"), compression=None)], tasks=tasks, workers=tasks,
                          logging_dir=str(out / "logs"), skip_completed=False).run()
    docs = sorted((json.loads(line) for f in (out / "docs").glob("*.jsonl") for line in f.open()),
                  key=lambda d: d["id"])
    stats = {}  # step name -> {stat: total}, summed over ranks
    for step in json.loads((out / "logs" / "stats.json").read_text()):
        stats[step["name"].split(": ", 1)[-1]] = {k: v["total"] if isinstance(v, dict) else v
                                                  for k, v in step["stats"].items()}
    return docs, stats


def test_the_crawl_reads_whole_with_its_main_text_and_any_worker_count(tmp_path):
    truth = make_web_corpus(tmp_path / "crawl", seed=3, num_originals=24, exact_dups=4, near_dup_edits=(2,),
                            near_dups_per_level=4, spam_pages=4, pii_pages=4)
    pipeline = [WarcReader(str(tmp_path / "crawl")), TextFileReader(str(tmp_path / "crawl" / "html")), HtmlExtractor()]
    docs, stats = run(pipeline, tmp_path, "one")
    pages = {p["id"]: p for p in truth["pages"]}
    assert [d["id"].removeprefix(str(tmp_path / "crawl") + "/") for d in docs if d["id"].startswith("http")] == \
        sorted(i for i in pages if i.startswith("http"))
    assert len(docs) == len(pages) == stats["🕷 WARC"]["documents_in"] + stats["📄 text files"]["documents_in"]
    for doc in docs:
        page = pages[doc["id"] if doc["id"].startswith("http") else f"html/{doc['id']}"]
        assert " ".join(page["text"][:80].split()[:-1]) in " ".join(doc["text"].split())  # the article is there ...
        assert "Copyright 2026" not in doc["text"] and "Contact</a>" not in doc["text"]  # ... the boilerplate is not
        assert doc["metadata"]["format"] == "text"
    two, _ = run(pipeline, tmp_path, "two", tasks=2)
    assert [(d["id"], d["text"]) for d in two] == [(d["id"], d["text"]) for d in docs]


def test_warc_and_wet_records_are_each_counted(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()

    def record(kind: str, url: str, block: bytes) -> bytes:
        head = (f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: {url}\r\nContent-Length: {len(block)}\r\n\r\n")
        return gzip.compress(head.encode() + block + b"\r\n\r\n")
    page = "<html><body><article><p>" + "The quiet river keeps the old mill near the bridge. " * 12 + \
           "</p></article></body></html>"
    latin = "<html><body><article><p>" + "Caf\xe9 cr\xe8me near the harbour keeps the morning warm. " * 12 + \
            "</p></article></body></html>"
    http = b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\n\r\n"
    (folder / "crawl.warc.gz").write_bytes(
        record("warcinfo", "", b"software: test\r\n")
        + record("request", "https://a.example/", b"GET / HTTP/1.1\r\n\r\n")
        + warc_record("https://a.example/", page, "00000000-0000-0000-0000-000000000001")
        + record("response", "https://a.example/missing", http % (404, b"text/html") + b"<html>gone</html>")
        + record("response", "https://a.example/logo.png", http % (200, b"image/png") + b"\x89PNG")
        + record("response", "https://b.example/", http % (200, b"text/html; charset=utf-8") + latin.encode("latin-1"))
        + record("response", "https://c.example/empty", http % (200, b"text/html") + b"   "))
    (folder / "crawl.warc.wet.gz").write_bytes(record("conversion", "https://d.example/", b"Plain text of a page."))
    docs, stats = run([WarcReader(str(folder)), HtmlExtractor()], tmp_path, "out")
    warc = stats["🕷 WARC"]
    assert warc["documents_in"] == 6 and warc["skipped_warcinfo"] == 1 and warc["skipped_request"] == 1
    assert warc["dropped_http_status_not_200"] == 1 and warc["dropped_not_html"] == 1 and warc["dropped_empty"] == 1
    assert warc["decoded_fallback"] == 1
    assert [d["id"] for d in docs] == ["https://a.example/", "https://b.example/", "https://d.example/"]
    assert "Café crème" in docs[1]["text"]  # mislabelled Latin-1 read as browsers read it, not lost
    assert docs[2]["text"] == "Plain text of a page." and docs[0]["metadata"]["url"] == "https://a.example/"


def test_files_are_typed_by_suffix_and_empty_or_non_utf8_ones_counted(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.py").write_text("def f():\n    return 1\n")
    (folder / "b.txt").write_bytes("na\xefve".encode("latin-1"))
    (folder / "c.md").write_text("  \n")
    (folder / "d.html").write_text("<html><body><p>hi</p></body></html>")
    docs, stats = run([TextFileReader(str(folder))], tmp_path, "out")
    assert {d["id"]: d["metadata"]["format"] for d in docs} == {"a.py": "code", "d.html": "html"}
    files = stats["📄 text files"]
    assert files["documents_in"] == 4 and files["dropped_empty"] == 1 and files["dropped_invalid_utf8"] == 1


def test_warc_records_skip_garbage_and_report_a_cut_record():
    import io

    from lmforge.dataprep.readers import warc_records

    def record(uri: str, block: bytes, length: str | None = None) -> bytes:
        return (f"WARC/1.1\r\nWARC-Type: conversion\r\nWARC-Target-URI: {uri}\r\n"
                f"Content-Length: {length or len(block)}\r\n\r\n").encode() + block + b"\r\n\r\n"
    stream = (record("a", b"first") + b"garbage\r\nmore garbage\r\n" + record("b", b"second")
              + record("c", b"bad length", length="ten") + record("d", b"fourth") + record("e", b"cut short")[:-8])
    got = [(r.headers.get("warc-target-uri"), r.block, r.problem) for r in warc_records(io.BytesIO(stream))]
    assert got == [("a", b"first", None), (None, b"", "malformed_warc"), ("b", b"second", None),
                   ("c", b"", "malformed_warc"), ("d", b"fourth", None), ("e", b"cut s", "truncated")]


# ----------------------------------------------------------------------------- inputs over the cap

CAP = 1 << 20  # max_document_bytes of these tests: what a reader may hold of one record
MiB = bytes(1 << 20)


def read_in_process(reader) -> tuple[list, dict, int]:
    """(documents, stats, peak traced bytes) of a reader run in this process."""
    tracemalloc.start()
    try:
        docs = list(reader.run())
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return docs, {k: v.total for k, v in reader.stats.stats.items()}, peak_bytes


def conversion(uri: str, block: bytes, length: int | None = None) -> bytes:
    return (f"WARC/1.1\r\nWARC-Type: conversion\r\nWARC-Target-URI: {uri}\r\n"
            f"Content-Length: {len(block) if length is None else length}\r\n\r\n").encode() + block + b"\r\n\r\n"


def gzip_member(*parts, repeat_zeros_mib: int = 0) -> bytes:
    """One gzip member of parts[0], then repeat_zeros_mib MiB of zeros, then the other parts, compressed a
    MiB at a time (never the whole in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [packer.compress(parts[0])] + [packer.compress(MiB) for _ in range(repeat_zeros_mib)]
    return b"".join(out + [packer.compress(p) for p in parts[1:]] + [packer.flush()])


def test_a_warc_record_declaring_10_gb_is_skipped_unread_and_the_next_one_read(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "big.warc", "wb") as f:  # a sparse file: 10 GB long, a few KB on disk
        f.write(conversion("https://a.example/", b"First page."))
        f.write(conversion("https://huge.example/", b"", length=10 * 10**9)[:-4])
        f.seek(10 * 10**9, os.SEEK_CUR)
        f.write(b"\r\n\r\n" + conversion("https://b.example/", b"After the huge one."))
    reader = WarcReader(str(folder), max_document_bytes=CAP, problems_dir=tmp_path / "p")
    docs, stats, peak_bytes = read_in_process(reader)
    assert [d.id for d in docs] == ["https://a.example/", "https://b.example/"]
    assert stats["documents_in"] == 3 and stats["dropped_too_large"] == 1
    problem = json.loads((tmp_path / "p").glob("*.jsonl").__next__().read_text())
    assert problem["reason"] == "too_large" and "10,000,000,000" in problem["detail"]
    assert peak_bytes < CAP + (16 << 20), f"{peak_bytes:,} bytes at the peak"


def test_a_gzip_bomb_in_a_warc_stays_bounded_block_or_garbage(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    # 200 MB of zeros, ~200 KB compressed: once a record's block (its Content-Length true), once bytes where a
    # header should be, with no newline in them
    bomb_block = gzip_member(b"WARC/1.1\r\nWARC-Type: conversion\r\nWARC-Target-URI: https://bomb.example/\r\n"
                             + f"Content-Length: {200 << 20}\r\n\r\n".encode(), b"\r\n\r\n", repeat_zeros_mib=200)
    garbage = gzip_member(b"garbage ", b"\r\n", repeat_zeros_mib=200)
    (folder / "bomb.warc.gz").write_bytes(gzip.compress(conversion("https://a.example/", b"First page."))
                                          + bomb_block + gzip.compress(conversion("https://b.example/", b"Second."))
                                          + garbage + gzip.compress(conversion("https://c.example/", b"Third.")))
    docs, stats, peak_bytes = read_in_process(WarcReader(str(folder), max_document_bytes=CAP))
    assert [d.id for d in docs] == ["https://a.example/", "https://b.example/", "https://c.example/"]
    assert stats["dropped_too_large"] == 1 and stats["dropped_malformed_warc"] == 1 and stats["documents_in"] == 5
    assert peak_bytes < CAP + (16 << 20), f"{peak_bytes:,} bytes at the peak"


def test_a_100_mb_jsonl_line_and_a_jsonl_gzip_bomb_are_skipped_unread(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "long.jsonl", "wb") as f:
        f.write(b'{"text": "short one"}\n{"text": "')
        for _ in range(100):
            f.write(b"a" * len(MiB))
        f.write(b'"}\n{"text": "after the long line"}\n')
    (folder / "bomb.jsonl.gz").write_bytes(gzip_member(b'{"text": "', b'"}\n{"text": "after the bomb"}\n',
                                                       repeat_zeros_mib=200))
    docs, stats, peak_bytes = read_in_process(InputReader(str(folder), max_document_bytes=CAP))
    assert sorted(d.text for d in docs) == ["after the bomb", "after the long line", "short one"]
    assert {d.id for d in docs} == {"bomb.jsonl.gz:2", "long.jsonl:1", "long.jsonl:3"}  # line numbers still right
    assert stats["documents_in"] == 5 and stats["dropped_too_large"] == 2
    assert peak_bytes < CAP + (16 << 20), f"{peak_bytes:,} bytes at the peak"


def test_a_file_is_read_no_further_than_the_cap_whatever_size_was_reported(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "grown.txt").write_bytes(b"a" * (CAP + 1))  # grew after it was listed, or lies (procfs says 0)
    (folder / "ok.txt").write_bytes(b"fine")
    reader = TextFileReader(str(folder), max_document_bytes=CAP)
    monkeypatch.setattr(reader.data_folder, "size", lambda path: 0)
    docs, stats, _ = read_in_process(reader)
    assert [d.id for d in docs] == ["ok.txt"] and stats["dropped_too_large"] == 1


def test_a_warc_header_over_its_cap_is_malformed_and_one_cut_short_is_truncated():
    import io

    from lmforge.dataprep.readers import MAX_WARC_HEADER_BYTES, warc_records

    long_uri = "https://a.example/" + "x" * MAX_WARC_HEADER_BYTES  # one header line over the cap of them all
    many = "".join(f"X-Field-{i}: {'y' * 1000}\r\n" for i in range(MAX_WARC_HEADER_BYTES // 1000))  # many lines
    stream = (conversion(long_uri, b"too long a header") + conversion("b", b"second")
              + conversion("c", b"many headers").replace(b"\r\n\r\n", f"\r\n{many}\r\n".encode(), 1)
              + conversion("d", b"fourth") + b"WARC/1.1\r\nWARC-Type: conversion\r\n")
    got = [(r.headers.get("warc-target-uri"), r.block, r.problem) for r in warc_records(io.BytesIO(stream))]
    assert got == [(None, b"", "malformed_warc"), ("b", b"second", None), ("c", b"", "malformed_warc"),
                   ("d", b"fourth", None), (None, b"", "truncated")]
