"""The synthetic crawl the data-pipeline tests and bench score against: deterministic, and its ground
truth true of the files it writes."""

import gzip
import json
import zlib
from collections import Counter

from lmforge.dataprep.pii import redact
from lmforge.dataprep.synthetic import make_web_corpus


def warc_members(data: bytes) -> list[bytes]:
    """Each gzip member of a .warc.gz decompressed on its own (one record per member, as Common Crawl)."""
    members = []
    while data:
        d = zlib.decompressobj(31)
        members.append(d.decompress(data))
        data = d.unused_data
    return members


def test_the_crawl_is_deterministic_and_its_truth_holds(tmp_path):
    small = dict(num_originals=30, exact_dups=5, near_dup_edits=(1, 8), near_dups_per_level=4, spam_pages=5,
                 pii_pages=10)
    truth = make_web_corpus(tmp_path / "a", seed=7, **small)
    make_web_corpus(tmp_path / "b", seed=7, **small)
    for name in ("crawl.warc.gz", "truth.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    pages = truth["pages"]
    assert Counter(p["kind"] for p in pages) == {"original": 30, "exact_dup": 5, "near_dup": 8, "spam": 5}
    records = warc_members((tmp_path / "a" / "crawl.warc.gz").read_bytes())
    urls = [r.split(b"WARC-Target-URI: ")[1].split(b"\r\n")[0].decode() for r in records]
    html_files = sorted(p.name for p in (tmp_path / "a" / "html").iterdir())
    assert sorted(urls + [f"html/{f}" for f in html_files]) == sorted(p["id"] for p in pages)
    assert b"".join(records) == gzip.decompress((tmp_path / "a" / "crawl.warc.gz").read_bytes())
    by_id = {p["id"]: p for p in pages}
    for p in pages:
        if p["kind"] == "exact_dup":
            assert p["text"] == by_id[p["of"]]["text"] and p["id"] != p["of"]
        if p["kind"] == "near_dup":
            assert p["text"] != by_id[p["of"]]["text"] and 0.5 < p["jaccard"] < 1
    one, eight = ([p["jaccard"] for p in pages if p.get("edits") == k] for k in (1, 8))
    assert min(one) > max(eight)  # more edits, less overlap
    for p in pages:  # (a near copy's edits may have replaced a planted value: scoring allows for that)
        if "pii" in p and p["kind"] != "near_dup":  # every planted value is in the text; redaction finds those
            _, counts = redact(p["text"])
            assert all(v in p["text"] for _, v in p["pii"]) and counts == Counter(k for k, _ in p["pii"])
    assert json.loads((tmp_path / "a" / "truth.json").read_text()) == truth
