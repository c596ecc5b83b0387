"""Pipeline inputs: the synthetic crawl read from HTML files and a WARC, main text extracted, the same
with 1 or 2 workers; WARC/WET and file edge cases each counted by reason."""

import gzip
import json

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.writers import JsonlWriter

from lmforge.dataprep.readers import HtmlExtractor, TextFileReader, WarcReader
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
