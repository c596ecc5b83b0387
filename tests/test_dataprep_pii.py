"""PII redaction: every planted kind found and replaced by its placeholder; look-alikes left alone."""

import random
from collections import Counter

import pytest

from lmforge.dataprep.pii import FINDERS, PLACEHOLDERS, find, luhn_ok, redact
from lmforge.dataprep.synthetic import LOOK_ALIKES, fake_pii, look_alike, sentence


@pytest.mark.parametrize("text, kind", [
    ("ann.lee+news@mail.example.org", "email"),
    ("81.2.69.160", "ip_address"),
    ("2a00:1450:4001:82b::200e", "ip_address"),
    ("8.8.8.8", "ip_address"),
    ("(202) 555-0147", "phone"),
    ("+44 20 7946 0958", "phone"),
    ("202.555.0147", "phone"),
    ("4111 1111 1111 1111", "credit_card"),
    ("3782-822463-10005", "credit_card"),
    ("5500000000000004", "credit_card"),
    ("AKIAIOSFODNN7EXAMPLE", "secret"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----", "secret"),
    ("ghp_" + "A1b2" * 9, "secret"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "secret"),
])
def test_each_kind_is_found_and_replaced(text, kind):
    out, counts = redact(f"see {text} here")
    assert out == f"see {PLACEHOLDERS[kind]} here" and counts == Counter({kind: 1})


def test_only_the_secret_itself_goes_where_a_key_names_it():
    out, _ = redact("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
                    "Authorization: Bearer abcdef0123456789abcdef")
    assert out == "aws_secret_access_key = <SECRET>\nAuthorization: Bearer <SECRET>"


@pytest.mark.parametrize("text", [
    "Python 3.11.7.1", "v1.2.3.4", "release 10.0.19041.1", "1.2.3.4.5", "OID 1.3.6.1.4.1.311", "version: 2.7.18.4",
    "4111 1111 1111 1112",  # fails Luhn
    "1234567812345670",  # passes Luhn, but no card network starts with 12
    "2024-01-15", "978-3-16-148410-0", "12:30:45", "std::map<int, int>", "123e4567-e89b-12d3-a456-426614174000",
    "da39a3ee5e6b4b0d3255bfef95601890afd80709", "1,234,567", "mac 00:1A:2B:3C:4D:5E", "sk-short",
    # addresses that name no one: loopback, private, unspecified, link-local, documentation
    "127.0.0.1", "192.168.1.20", "10.0.0.7", "0.0.0.0", "::1", "fe80::1", "2001:db8::8a2e:370:7334", "192.0.2.15",
])
def test_look_alikes_are_left_alone(text):
    assert find(text) == [], text


def test_luhn_on_known_numbers():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_a_card_inside_a_secret_is_one_secret():
    text = "key: sk-4111111111111111abcdefghijkl"
    assert redact(text) == ("key: <SECRET>", Counter({"secret": 1}))


def test_planted_pii_is_all_found_and_look_alikes_never():
    """The issue's bar, on 2,000 random plants of every kind and 2,000 look-alikes: >= 99% found, 0 false
    positives (here exactly: 100% and 0, so a regression shows at once)."""
    rng = random.Random(1234)
    missed, planted = Counter(), Counter()
    for _ in range(2000):
        kind = rng.choice(list(FINDERS))
        value = fake_pii(rng, kind)
        out, counts = redact(f"{sentence(rng, 5)} {value} {sentence(rng, 4)}.")
        planted[kind] += 1
        if value in out or counts != Counter({kind: 1}):
            missed[kind] += 1
    assert not missed, (missed, planted)
    false = Counter()
    for _ in range(2000):
        kind = rng.choice(LOOK_ALIKES)
        if find(f"{sentence(rng, 5)} {look_alike(rng, kind)} {sentence(rng, 4)}."):
            false[kind] += 1
    assert not false, false
