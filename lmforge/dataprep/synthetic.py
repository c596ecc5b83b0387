"""Synthetic test data for the data pipeline, made on the spot from a seed: nothing downloaded.

Planted personal data of every kind pii.py redacts, and look-alikes it must leave alone; and a
whole synthetic web crawl (`make_web_corpus`: HTML files and a WARC) with exact and near
duplicates at known edit distances, spam pages and planted PII, each with its ground truth, so
tests and bench/ can score recall and false positives.
"""

from __future__ import annotations

import ipaddress
import random
import string

from lmforge.dataprep.pii import FINDERS, luhn_ok

FINDER_KINDS = tuple(FINDERS)  # every kind pii.py finds
_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
          "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
_TLDS = ("com", "org", "net", "io", "co.uk", "de", "fr", "info", "dev")
_CARD_PREFIXES = ("4", "51", "52", "53", "54", "55", "2221", "2720", "34", "37", "6011", "65")


def _luhn_complete(prefix_and_body: str) -> str:
    """Append the check digit that makes the number pass Luhn."""
    for d in "0123456789":
        if luhn_ok(prefix_and_body + d):
            return prefix_and_body + d
    raise AssertionError("a Luhn check digit always exists")


def card_number(rng: random.Random, valid: bool = True) -> str:
    prefix = rng.choice(_CARD_PREFIXES)
    length = 15 if prefix in ("34", "37") else 16
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    number = _luhn_complete(body)
    if not valid:  # the same digits with a wrong check digit
        number = number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)
    if length == 15:
        groups = [number[:4], number[4:10], number[10:]]
    else:
        groups = [number[i:i + 4] for i in range(0, 16, 4)]
    return rng.choice((" ", "-", "")).join(groups)


def fake_pii(rng: random.Random, kind: str) -> str:
    """One random value of a kind pii.py must find."""
    if kind == "email":
        user = rng.choice(_WORDS) + rng.choice((".", "_", "+", "")) + rng.choice(_WORDS) + str(rng.randint(0, 99))
        return f"{user}@{rng.choice(_WORDS)}-{rng.choice(_WORDS)}.{rng.choice(_TLDS)}"
    if kind == "ip_address":  # a public address (private and reserved ones are look-alikes)
        while True:
            if rng.random() < 0.2:
                groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
                groups[0] = f"{rng.randint(0x2000, 0x3FFF):x}"  # global unicast, 2000::/3
                value = (":".join(groups[:3]) + "::" + ":".join(groups[6:]) if rng.random() < 0.5
                         else ":".join(groups))
            else:
                value = ".".join(str(rng.randint(1 if i == 0 else 0, 255)) for i in range(4))
            if ipaddress.ip_address(value).is_global:
                return value
    if kind == "phone":
        area, mid, last = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
        forms = (f"({area}) {mid}-{last:04d}", f"{area}-{mid}-{last:04d}", f"{area}.{mid}.{last:04d}",
                 f"+1 {area} {mid} {last:04d}", f"+44 20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
                 f"+49 30 {rng.randint(100000, 999999)}{rng.randint(10, 99)}", f"{area} {mid} {last:04d}")
        return rng.choice(forms)
    if kind == "credit_card":
        return card_number(rng)
    if kind == "secret":
        alnum = string.ascii_letters + string.digits
        pick = rng.randrange(6)
        if pick == 0:
            return "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
        if pick == 1:
            return "ghp_" + "".join(rng.choice(alnum) for _ in range(36))
        if pick == 2:
            return "sk-" + "".join(rng.choice(alnum) for _ in range(40))
        if pick == 3:
            return "AIza" + "".join(rng.choice(alnum + "_-") for _ in range(35))
        if pick == 4:
            body = "\n".join("".join(rng.choice(alnum + "+/") for _ in range(64)) for _ in range(3))
            return f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"
        return "xoxb-" + "-".join("".join(rng.choice(string.digits) for _ in range(12)) for _ in range(2)) + "-" + \
            "".join(rng.choice(alnum) for _ in range(24))
    raise ValueError(f"unknown kind {kind!r}")


LOOK_ALIKES = ("version", "invalid_card", "date", "isbn", "time", "uuid", "hash", "number", "oid", "local_ip")


def look_alike(rng: random.Random, kind: str) -> str:
    """Text that resembles personal data and must not be redacted."""
    if kind == "version":
        parts = ".".join(str(rng.randint(0, 20)) for _ in range(4))
        return rng.choice((f"version {parts}", f"v{parts}", f"Python {parts}", f"release {parts}", f"build {parts}",
                           f"{parts}.{rng.randint(1, 9)}"))
    if kind == "invalid_card":
        return card_number(rng, valid=False)
    if kind == "date":
        return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == "isbn":
        return f"978-{rng.randint(0, 9)}-{rng.randint(10, 99)}-{rng.randint(100000, 999999)}-{rng.randint(0, 9)}"
    if kind == "time":
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
    if kind == "uuid":
        h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    if kind == "hash":
        return "".join(rng.choice("0123456789abcdef") for _ in range(40))
    if kind == "number":
        return f"{rng.randint(10**5, 10**9):,}"
    if kind == "oid":
        return "1.3.6.1.4.1." + ".".join(str(rng.randint(1, 999)) for _ in range(3))
    if kind == "local_ip":  # an address that names no one: loopback, private, link-local, documentation
        a, b = rng.randint(0, 255), rng.randint(1, 254)
        return rng.choice((f"127.0.0.{b}", f"10.{a}.{a}.{b}", f"192.168.{a}.{b}", f"172.{rng.randint(16, 31)}.{a}.{b}",
                           f"169.254.{a}.{b}", "0.0.0.0", f"192.0.2.{b}", "::1", f"fe80::{a:x}{b:02x}",
                           f"2001:db8::{a:x}{b:02x}"))
    raise ValueError(f"unknown look-alike {kind!r}")


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize()


# ----------------------------------------------------------------------------- a synthetic web crawl

_PROSE = {
    "det": "the a this that every each some no our their".split(),
    "noun": ("river garden engine village teacher market library window harbour bridge farmer doctor "
             "museum painter kitchen mountain student council railway forest journal festival bakery "
             "orchestra lantern meadow factory island").split(),
    "verb": ("builds finds keeps opens carries follows watches repairs paints measures visits protects "
             "describes welcomes gathers explains").split(),
    "adj": ("old quiet busy small bright careful famous early northern simple heavy gentle local wooden "
            "patient").split(),
    "prep": "near under beside across behind within beyond around".split(),
}
_SPAM = ("cheap pills buy now best price casino bonus free money click here win big limited offer "
         "viagra discount crypto giveaway").split()


def prose_sentence(rng: random.Random) -> str:
    """A grammatical English sentence (determiners and prepositions give the stop words quality filters
    look for)."""
    p = _PROSE
    words = [rng.choice(p["det"]), rng.choice(p["adj"]), rng.choice(p["noun"]), rng.choice(p["verb"]),
             rng.choice(p["det"]), rng.choice(p["noun"]), rng.choice(p["prep"]), "the", rng.choice(p["noun"])]
    if rng.random() < 0.5:
        words += ["and", rng.choice(p["verb"]), "it", rng.choice(p["prep"]), "the", rng.choice(p["adj"]),
                  rng.choice(p["noun"])]
    return " ".join(words).capitalize() + rng.choice((".", ".", ".", "!", "?"))


def prose_paragraphs(rng: random.Random, n: int) -> list[str]:
    return [" ".join(prose_sentence(rng) for _ in range(rng.randint(4, 8))) for _ in range(n)]


def edit_words(rng: random.Random, text: str, num_edits: int) -> str:
    """The text with num_edits random word substitutions, insertions or deletions (paragraphs kept)."""
    paragraphs = [p.split(" ") for p in text.split("\n\n")]
    vocab = [w for ws in _PROSE.values() for w in ws]
    for _ in range(num_edits):
        words = rng.choice([p for p in paragraphs if len(p) > 1])
        i, op = rng.randrange(len(words)), rng.randrange(3)
        if op == 0:
            words[i] = rng.choice(vocab)
        elif op == 1:
            words.insert(i, rng.choice(vocab))
        else:
            del words[i]
    return "\n\n".join(" ".join(p) for p in paragraphs)


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """Jaccard similarity of two texts' word n-gram sets (lower-cased): what MinHash estimates."""
    def grams(t):
        w = t.lower().split()
        return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / max(1, len(ga | gb))


def spam_text(rng: random.Random) -> tuple[str, str]:
    """(kind, text) of a page every quality filter should drop."""
    kind = rng.choice(("keyword stuffing", "lorem ipsum", "link farm", "too short"))
    if kind == "keyword stuffing":
        text = "\n\n".join(" ".join(rng.choice(_SPAM) for _ in range(60)) for _ in range(4))
    elif kind == "lorem ipsum":
        lorem = ("dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore "
                 "magna aliqua enim minim veniam quis nostrud exercitation ullamco laboris nisi aliquip").split()
        text = "\n\n".join("Lorem ipsum " + " ".join(rng.choice(lorem) for _ in range(40)) + "." for _ in range(6))
    elif kind == "link farm":
        text = "\n".join(f"{rng.choice(_SPAM)} {rng.choice(_SPAM)}" for _ in range(80))
    else:
        text = "Welcome! " + rng.choice(_SPAM).capitalize() + "."
    return kind, text


def html_page(title: str, text: str) -> str:
    """A page with boilerplate around the article, as crawled pages have."""
    body = "\n".join(f"<p>{p}</p>" for p in text.split("\n\n"))
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head><body>\n"
            "<nav><a href=\"/\">Home</a> | <a href=\"/about\">About</a> | <a href=\"/contact\">Contact</a></nav>\n"
            f"<article><h1>{title}</h1>\n{body}\n</article>\n"
            "<footer>Copyright 2026. All rights reserved. <a href=\"/privacy\">Privacy</a></footer>\n</body></html>\n")


def warc_record(url: str, html: str, record_id: str, date: str = "2026-11-01T00:00:00Z") -> bytes:
    """One gzip member holding a WARC/1.0 response record, as Common Crawl writes them (one member per
    record, so readers can seek record by record)."""
    import gzip

    body = html.encode("utf-8")
    http = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\nWARC-Date: {date}\r\n"
            f"WARC-Record-ID: <urn:uuid:{record_id}>\r\nContent-Type: application/http; msgtype=response\r\n"
            f"Content-Length: {len(http)}\r\n\r\n").encode()
    return gzip.compress(head + http + b"\r\n\r\n", mtime=0)


def make_web_corpus(out_dir, *, seed: int = 0, num_originals: int = 200, exact_dups: int = 40,
                    near_dup_edits: tuple[int, ...] = (1, 2, 3, 5, 8), near_dups_per_level: int = 16,
                    spam_pages: int = 30, pii_pages: int = 60, warc_files: int = 1) -> dict:
    """A crawl with known answers: half the pages as HTML files under out_dir/html/, half as response
    records in out_dir/crawl.warc.gz (or crawl-NNNNN.warc.gz, with warc_files > 1: a crawl comes as many
    archives, and the pipeline reads files in parallel, not records). Planted: exact copies of
    originals (under another URL), near copies at known word-edit counts (their 5-gram Jaccard to the
    original recorded), spam pages, and pages carrying PII (one value of each kind) beside
    look-alikes. Returns the ground truth, also written to out_dir/truth.json; document ids are the
    HTML file's path or the record's URL."""
    import json
    import uuid
    from pathlib import Path

    rng = random.Random(seed)
    out = Path(out_dir)
    (out / "html").mkdir(parents=True, exist_ok=True)
    pages: list[dict] = []
    for i in range(num_originals):
        pages.append({"kind": "original", "title": f"{rng.choice(_PROSE['adj']).title()} "
                      f"{rng.choice(_PROSE['noun']).title()} {i}", "text": "\n\n".join(
                          prose_paragraphs(rng, rng.randint(3, 5)))})
    originals = list(range(num_originals))
    for i in range(pii_pages):  # PII goes into originals, so every kind also meets the dedup stages
        page = pages[originals[i]]
        planted = [[kind, fake_pii(rng, kind)] for kind in FINDER_KINDS]
        alikes = [look_alike(rng, kind) for kind in rng.sample(LOOK_ALIKES, 3)]
        lines = [f"Contact {v} for details." for _, v in planted] + [f"See item {v} in the list." for v in alikes]
        page.update(text=page["text"] + "\n\n" + " ".join(lines), pii=planted, look_alikes=alikes)
    for _ in range(exact_dups):
        src = rng.choice(originals)
        pages.append({**pages[src], "kind": "exact_dup", "of": src})
    for edits in near_dup_edits:
        for _ in range(near_dups_per_level):
            src = rng.choice(originals)
            text = edit_words(rng, pages[src]["text"], edits)
            pages.append({**pages[src], "kind": "near_dup", "of": src, "edits": edits, "text": text,
                          "jaccard": shingle_jaccard(pages[src]["text"], text)})
    for _ in range(spam_pages):
        kind, text = spam_text(rng)
        pages.append({"kind": "spam", "spam": kind, "title": "Best deals", "text": text})
    order = list(range(len(pages)))
    rng.shuffle(order)
    warcs = [bytearray() for _ in range(warc_files)]
    for n, i in enumerate(order):
        page = pages[i]
        html = html_page(page["title"], page["text"])
        if n % 2 == 0:
            page["id"] = f"html/page_{i:05d}.html"
            (out / page["id"]).write_text(html, encoding="utf-8")
        else:
            page["id"] = f"https://site{i % 17}.example/articles/{i:05d}"
            warcs[n // 2 % warc_files] += warc_record(page["id"], html, str(uuid.UUID(int=rng.getrandbits(128))))
    for k, warc in enumerate(warcs):
        (out / ("crawl.warc.gz" if warc_files == 1 else f"crawl-{k:05d}.warc.gz")).write_bytes(bytes(warc))
    truth = {"seed": seed, "pages": [{k: v for k, v in p.items() if k != "title"} for p in pages]}
    for page in truth["pages"]:
        if "of" in page:
            page["of"] = pages[page["of"]]["id"]
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def score_prepared(truth: dict, work_dir) -> dict:
    """How a pipeline run (prepare with keep_work) did on this crawl: planted copies found as duplicates
    of their own original, documents merged with a different page (false positives), planted PII left
    in kept documents, and look-alikes wrongly redacted. A copy counts only when it and another page of
    its group reached deduplication (a quality filter may drop both first). Ids must be the truth's
    (one input: the crawl folder)."""
    import json
    from collections import Counter
    from pathlib import Path

    work = Path(work_dir)
    survivor_of = json.loads((work / "duplicates.json").read_text())
    kept = {}
    for path in sorted((work / "kept").glob("*.jsonl")):
        for line in path.open():
            doc = json.loads(line)
            kept[doc["id"]] = doc["text"]
    pages = {p["id"]: p for p in truth["pages"]}
    group = {i: p.get("of", i) for i, p in pages.items()}  # every page -> the original it copies
    same_text = {}
    for i, p in pages.items():  # pages that happen to be identical (spam templates) are one group too
        group[i] = same_text.setdefault(p["text"], group[i])
    reached_ids = {json.loads(line)[0] for path in (work / "keys").glob("*.keys") for line in path.open()}
    reached = Counter(group[i] for i in reached_ids if i in group)  # pages of each group that got to dedup
    copies = [i for i, p in pages.items()
              if p["kind"] in ("exact_dup", "near_dup") and i in reached_ids and reached[group[i]] >= 2]
    found = [i for i in copies if i in survivor_of and group.get(survivor_of[i]) == group[i]]
    merged_wrongly = [i for i, s in survivor_of.items() if i in group and group.get(s) != group[i]]
    # a near copy inherits its original's planted values, but its word edits may have cut one out
    planted = [(i, v) for i, p in pages.items() if i in kept for _, v in p.get("pii", []) if v in p["text"]]
    alikes = [(i, v) for i, p in pages.items() if i in kept for v in p.get("look_alikes", []) if v in p["text"]]
    return {"copies": len(copies), "copies_found": len(found), "documents": len(pages),
            "false_merges": len(merged_wrongly), "pii_planted_in_kept": len(planted),
            "pii_left": sum(value in kept[i] for i, value in planted),
            "look_alikes_in_kept": len(alikes),
            "look_alikes_redacted": sum(value not in kept[i] for i, value in alikes)}
