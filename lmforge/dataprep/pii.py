"""Personal data and secrets out of training text: found, replaced by a typed placeholder, counted.

    redact("mail me at ann@example.org from 81.2.69.160")
    -> ("mail me at <EMAIL> from <IP_ADDRESS>", Counter({"email": 1, "ip_address": 1}))

What is found (a model that reads these can repeat them; BigCode's StarCoder PII pipeline and
datatrove's PIIFormatter redact the first two, we add the rest):
  email        local@domain.tld
  ip_address   public IPv4 (each octet 0-255, no leading zeros) and IPv6 (as `ipaddress` parses it)
               addresses: `is_global`, as datatrove's PIIFormatter decides by default
  phone        10 to 15 digits written as a phone number: +CC with groups, (NNN) NNN-NNNN,
               NNN-NNN-NNNN / NNN.NNN.NNNN / NNN NNN NNNN
  credit_card  13 to 19 digits (optionally in groups of 4 or 4-6-5 with spaces or dashes) that pass
               the Luhn checksum and start like a real card number (Visa 4, Mastercard 51-55 /
               2221-2720, Amex 34/37, Discover 6011/65, JCB 35, Diners 36/38)
  secret       private-key blocks, AWS access key ids (AKIA/ASIA + 16), `aws_secret_access_key = ...`,
               GitHub (ghp_/gho_/ghs_/ghu_/github_pat_), Slack (xox?-), Google API (AIza + 35),
               OpenAI-style sk-..., JWTs, and the token after `Authorization: Bearer`

What is left alone, on purpose (look-alikes; tests/test_dataprep_pii.py plants each):
  - addresses that name no one: loopback, private, link-local, documentation and other reserved
    ranges (127.0.0.1, 10.0.0.7, 192.168.1.20, 0.0.0.0, ::1, 2001:db8::1). Code is full of them
    (941 of the stdlib's 1,677 addresses), and a placeholder there breaks code while protecting nobody.
  - version and object numbers shaped like IPs: preceded by "v"/"version"/"release"/"build"/
    "python"/... or part of a longer dotted run ("1.2.3.4.5"), and OIDs like 1.3.6.1.4.1.
  - digit runs that fail Luhn or start like no card network; dates (2024-01-15), ISBNs and
    order numbers that are not phone-shaped; UUIDs and git hashes.
  - example addresses are still addresses: user@example.com is redacted like any other.
`Redactor` is the pipeline step (datatrove), counting `redacted_<kind>` per value replaced.
Placeholders are "<EMAIL>", "<IP_ADDRESS>", "<PHONE>", "<CREDIT_CARD>", "<SECRET>": one word each,
so the text reads as before and a model learns where such data goes without learning any.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

PLACEHOLDERS = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "phone": "<PHONE>",
                "credit_card": "<CREDIT_CARD>", "secret": "<SECRET>"}

# ----------------------------------------------------------------------------- patterns

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}"  # local part
                    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")  # domain

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?![\w])")
# Candidates only (hex groups and colons); ipaddress decides, so "12:30:45" and C++'s "std::map" are not.
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
# Words that make a dotted quad a version, not an address ("v1.2.3.4", "Python 3.11.7.1", "build 10.0.19041.1").
_VERSION_CONTEXT = re.compile(r"(?:\bv|\bver\.?|\bversions?|\brelease|\bbuild|\bpython|\bkernel|\bfirmware|\brev\.?"
                              r"|\bpatch|\bOID|\bchrome|\bfirefox|\bwindows)\s*[:=]?\s*$", re.IGNORECASE)

_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,8}){1,4}"  # +44 20 7946 0958, +1-202-555-0147
    r"|\(\d{3}\)[ ]?\d{3}[ .-]\d{4}"  # (202) 555-0147
    r"|\d{3}([.-])\d{3}\1\d{4}"  # 202-555-0147, 202.555.0147 (one separator throughout)
    r"|\d{3} \d{3} \d{4}"  # 202 555 0147
    r")(?![\w.-]?\d)")

_CARD = re.compile(r"(?<![\w-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -]?)\d{6}\2\d{4,5})(?![\w-])")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|6011|65|35|3[68])")

# Each pattern with the literals one of which any match contains (in lower case): a substring test in C
# skips the regex on the text that cannot match, most text, and made the secret scan ~10x faster.
_SECRETS = [
    (re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY"
                r"(?: BLOCK)?-----", re.DOTALL), ("private key",)),
    (re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])"), ("akia", "asia")),
    (re.compile(r"(?i:aws_?secret_?(?:access_?)?key)['\"]?\s*[:=]\s*['\"]?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"),
     ("secret",)),
    (re.compile(r"(?<![\w])(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,255})(?![\w])"),
     ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    (re.compile(r"(?<![\w-])xox[abposr]-[A-Za-z0-9-]{10,}(?![\w-])"), ("xox",)),
    (re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])"), ("aiza",)),
    (re.compile(r"(?<![\w-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}(?![\w-])"), ("sk-",)),
    (re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?![\w-])"), ("eyj",)),
    (re.compile(r"(?i:\bbearer)\s+([A-Za-z0-9._~+/-]{16,}=*)"), ("bearer",)),
]


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) checksum every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ----------------------------------------------------------------------------- finders: text -> [(start, end)]

Span = tuple[int, int]


def _emails(text: str) -> list[Span]:
    return [m.span() for m in _EMAIL.finditer(text)]


def _ips(text: str) -> list[Span]:
    """Public addresses only: a loopback, private or documentation address identifies nobody."""
    spans = []
    for m in _IPV4.finditer(text):
        if _VERSION_CONTEXT.search(text[max(0, m.start() - 24):m.start()]):
            continue
        if ipaddress.IPv4Address(m.group()).is_global:
            spans.append(m.span())
    for m in _IPV6.finditer(text):
        try:
            address = ipaddress.IPv6Address(m.group())
        except ValueError:
            continue
        if any(c.isdigit() for c in m.group()) and address.is_global:
            spans.append(m.span())
    return spans


def _digit_checked(pattern: re.Pattern, text: str, ok: Callable[[str], bool]) -> list[Span]:
    """Spans of the pattern's matches whose digits (separators removed) pass `ok`."""
    return [m.span() for m in pattern.finditer(text) if ok(re.sub(r"\D", "", m.group()))]


def _phones(text: str) -> list[Span]:
    return _digit_checked(_PHONE, text, lambda digits: 10 <= len(digits) <= 15)


def _cards(text: str) -> list[Span]:
    return _digit_checked(_CARD, text, lambda digits: 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits))
                          and luhn_ok(digits))


def _secrets(text: str) -> list[Span]:
    spans, lower = [], text.lower()
    for pattern, literals in _SECRETS:
        if not any(literal in lower for literal in literals):
            continue
        for m in pattern.finditer(text):
            spans.append(m.span(1) if pattern.groups else m.span())
    return spans


# Order matters where spans overlap: a secret or card wins over the phone or IP inside it.
FINDERS: dict[str, Callable[[str], list[Span]]] = {"secret": _secrets, "credit_card": _cards, "email": _emails,
                                                   "ip_address": _ips, "phone": _phones}


def find(text: str, kinds: tuple[str, ...] = tuple(FINDERS)) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans of personal data in text, in text order. Where two
    finders claim overlapping text, the earlier kind in FINDERS wins."""
    taken: list[tuple[int, int, str]] = []
    for kind in FINDERS:
        if kind not in kinds:
            continue
        for start, end in FINDERS[kind](text):
            if all(end <= s or start >= e for s, e, _ in taken):
                taken.append((start, end, kind))
    return sorted(taken)


def redact(text: str, kinds: tuple[str, ...] = tuple(FINDERS)) -> tuple[str, Counter]:
    """The text with every span `find` reports replaced by its kind's placeholder, and the counts."""
    spans = find(text, kinds)
    if not spans:
        return text, Counter()
    out, last = [], 0
    for start, end, kind in spans:
        out += [text[last:start], PLACEHOLDERS[kind]]
        last = end
    out.append(text[last:])
    return "".join(out), Counter(kind for _, _, kind in spans)


class Redactor(PipelineStep):
    """The pipeline step: every document redacted; stats `redacted_<kind>` count the values replaced and
    `documents_redacted` the documents that had any."""

    name = "🕵 redact PII"
    type = "✂️ - FORMAT"

    def __init__(self, kinds: tuple[str, ...] = tuple(FINDERS)):
        super().__init__()
        unknown = set(kinds) - set(FINDERS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; choose from {list(FINDERS)}")
        self.kinds = tuple(kinds)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                doc.text, counts = redact(doc.text, self.kinds)
            for kind, n in counts.items():
                self.stat_update(f"redacted_{kind}", value=n)
            if counts:
                self.stat_update("documents_redacted")
            yield doc
