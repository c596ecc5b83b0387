"""Synthetic test data for the data pipeline, made on the spot from a seed: nothing downloaded.

Planted personal data of every kind pii.py redacts, and look-alikes it must leave alone, each
generated with its ground truth so a test or benchmark can score recall and false positives.
"""

from __future__ import annotations

import random
import string

from lmforge.dataprep.pii import luhn_ok

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
    if kind == "ip_address":
        if rng.random() < 0.2:
            groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
            return ":".join(groups[:3]) + "::" + ":".join(groups[6:]) if rng.random() < 0.5 else ":".join(groups)
        return ".".join(str(rng.randint(1 if i == 0 else 0, 255)) for i in range(4))
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


LOOK_ALIKES = ("version", "invalid_card", "date", "isbn", "time", "uuid", "hash", "number", "oid")


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
    raise ValueError(f"unknown look-alike {kind!r}")


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize()
