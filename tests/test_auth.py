"""Keys, authorisation, rate limits and the usage ledger (auth.py), and the `keys`/`usage` commands.

Key-store tests run on SQLite and, when it answers at 127.0.0.1:5432, on PostgreSQL in a schema of
their own that is dropped afterwards. Redis tests run when Redis answers at 127.0.0.1:6379, under a
key prefix of their own. Either one absent: those tests skip.
"""

import hashlib
import logging
import random
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from conftest import REDIS_URL, redis_answers

from lmforge.auth import (
    KeyRecord,
    KeyStore,
    MemoryRateLimiter,
    RedisRateLimiter,
    daily_table,
    default_db_url,
    env_admin_key,
    is_admin,
    ledger_table,
    make_rate_limiter,
    metadata,
    parse_key,
)
from lmforge.cli import main
from lmforge.common import LmforgeError

# PostgreSQL and Redis fixtures (db_url, pg_url, redis_prefix) live in conftest.py, shared with test_serve.py
# and test_feedback.py.


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture()
def store(db_url):
    s = KeyStore(db_url)
    yield s
    s.close()


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):  # absolute, as Redis scores would be
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["memory", "redis"])
def limiter_and_clock(request):
    clock = FakeClock()
    if request.param == "memory":
        return MemoryRateLimiter(clock), clock
    return RedisRateLimiter(REDIS_URL, prefix=request.getfixturevalue("redis_prefix"), clock=clock), clock


def all_rows(store: KeyStore) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(row) for table in metadata.sorted_tables for row in conn.execute(sa.select(table))]


# ----------------------------------------------------------------------------- keys

def test_plaintext_never_stored_and_hashes_salted(store, db_url, tmp_path):
    plain_a, rec_a = store.create_key("team-a")
    plain_b, rec_b = store.create_key("team-b")
    key_id, secret = parse_key(plain_a)
    assert key_id == rec_a.id and len(key_id) >= 8 and len(secret) >= 32
    assert re.fullmatch(r"lmf-[0-9a-f]{8,}-[A-Za-z0-9_-]{32,}", plain_a)
    secrets_ = [parse_key(plain_a)[1], parse_key(plain_b)[1]]
    for row in all_rows(store):
        text = " ".join(map(str, row))
        assert not any(s in text for s in secrets_), "a secret is stored in plain text"
    if db_url.startswith("sqlite"):  # the raw bytes too: the database file, its WAL and shared memory
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
        assert raw and not any(s.encode() in raw for s in secrets_)
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT key_id, salt, secret_hash FROM lmforge_keys")).all()
    salts = {r.salt for r in rows}
    assert len(salts) == 2 and all(len(bytes.fromhex(s)) >= 16 for s in salts)
    # Salted: the stored hash is not the bare sha256 of the secret.
    by_id = {r.key_id: r for r in rows}
    assert by_id[rec_a.id].secret_hash != hashlib.sha256(secrets_[0].encode()).hexdigest()


def test_keys_never_reach_the_logs(store, caplog):
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")  # statements *and* their parameters
    store.engine.echo = True
    plaintext, record = store.create_key("logged", rpm=5)
    assert store.authenticate(plaintext) == record
    assert store.authenticate(plaintext[:-2] + "zz") is None
    store.revoke("logged")
    assert "lmforge_keys" in caplog.text  # the logging did capture the statements
    assert parse_key(plaintext)[1] not in caplog.text


def test_authenticate_good_bad_revoked_tampered(store):
    plaintext, record = store.create_key("svc", models=["base"], rpm=10, tpm=500, token_budget=10_000)
    got = store.authenticate(plaintext)
    assert got == record and got.models == ["base"] and (got.rpm, got.tpm, got.token_budget) == (10, 500, 10_000)
    other, other_record = store.create_key("other")
    key_id, secret = parse_key(plaintext)
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in (f"lmf-{key_id}-{flipped}",  # tampered secret
                f"lmf-{other_record.id}-{secret}",  # this secret under another key's id
                f"lmf-{'0' * 12}-{secret}",  # unknown id
                plaintext + "x", plaintext[:-1], "", "lmf-", "sk-" + secret, plaintext.upper(), f"Bearer {plaintext}"):
        assert store.authenticate(bad) is None, bad
    revoked = store.revoke("svc")
    assert revoked.revoked and store.authenticate(plaintext) is None
    assert store.authenticate(other) == other_record  # revoking one key leaves the others
    with pytest.raises(LmforgeError, match="no live key named 'svc'"):
        store.revoke("svc")
    again, new_record = store.create_key("svc")  # a revoked key's name may be reused
    assert new_record.id != record.id and store.authenticate(again) == new_record
    assert store.authenticate(plaintext) is None
    assert [r.name for r in store.list_keys()] == ["other", "svc"]
    assert len(store.list_keys(include_revoked=True)) == 3


def test_user_mistakes_name_the_input(store):
    store.create_key("dup")
    with pytest.raises(LmforgeError, match="live key named 'dup' exists"):
        store.create_key("dup")
    with pytest.raises(LmforgeError, match="--models is empty"):
        store.create_key("m", models=[" ", ""])
    with pytest.raises(LmforgeError, match="--rpm 0"):
        store.create_key("r", rpm=0)
    with pytest.raises(LmforgeError, match="key name"):
        store.create_key("  ")
    with pytest.raises(LmforgeError, match="usage by 'week'"):
        store.usage(by="week")


def test_model_allow_list(store):
    _, everything = store.create_key("all-models")
    _, some = store.create_key("some", models=["base", " chat", "base"])
    assert everything.models is None and everything.allows("base") and everything.allows("anything")
    assert some.models == ["base", "chat"]  # trimmed, duplicates dropped, order kept
    reread = {r.name: r for r in store.list_keys()}
    assert reread["some"].allows("chat") and not reread["some"].allows("code") and not reread["some"].allows("")
    assert reread["all-models"].models is None


def test_admin_from_the_store_and_the_environment(store):
    admin_plain, admin_rec = store.create_key("root", admin=True)
    user_plain, user_rec = store.create_key("user")
    env_key = "e" * 40
    env = {"LMFORGE_ADMIN_KEY": env_key}
    assert is_admin(admin_plain, store.authenticate(admin_plain), env={})
    assert not is_admin(user_plain, store.authenticate(user_plain), env=env)
    assert is_admin(env_key, store.authenticate(env_key), env=env)  # not in the store, yet admin
    assert not is_admin(env_key[:-1] + "f", None, env=env)
    assert not is_admin(env_key, None, env={})
    store.revoke("root")
    assert not is_admin(admin_plain, store.authenticate(admin_plain), env={})
    assert env_admin_key({}) is None
    with pytest.raises(LmforgeError, match="LMFORGE_ADMIN_KEY is 5 characters"):
        env_admin_key({"LMFORGE_ADMIN_KEY": "admin"})


def test_default_url_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LMFORGE_DB", raising=False)
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    assert default_db_url() == f"sqlite:///{tmp_path / 'home' / 'lmforge.db'}"
    assert (tmp_path / "home").is_dir()
    monkeypatch.setenv("LMFORGE_DB", f"sqlite:///{tmp_path / 'other.db'}")
    KeyStore().create_key("x")
    assert (tmp_path / "other.db").exists() and not (tmp_path / "home" / "lmforge.db").exists()


@pytest.mark.parametrize("url, match", [("nonsense", "not a SQLAlchemy URL"), ("mysql://u@h/db", "not supported"),
                                        ("postgresql+psycopg://postgres@127.0.0.1:1/test", "cannot open")])
def test_unusable_database_urls(url, match):
    with pytest.raises(LmforgeError, match=match):
        KeyStore(url)


# ----------------------------------------------------------------------------- the ledger

def ledger_rows(store: KeyStore) -> list:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(ledger_table)).mappings().all()


def rollup_rows(store: KeyStore) -> list:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(daily_table)).mappings().all()


def utc_day(t: datetime) -> date:
    # SQLite returns naive UTC; PostgreSQL returns aware times in the session's zone.
    return (t.astimezone(timezone.utc) if t.tzinfo else t).date()


def test_duplicate_request_id_counts_once(store):
    _, rec = store.create_key("k")
    assert store.record_usage(rec.id, "base", "req-1", 100, 20, 64)
    assert not store.record_usage(rec.id, "base", "req-1", 100, 20, 64)  # a retried write
    assert not store.record_usage(rec.id, "chat", "req-1", 5, 5, 0)  # the id decides, not the contents
    assert len(ledger_rows(store)) == 1
    [row] = store.usage()
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (1, 100, 20, 64)


def _record_concurrently(stores: list[KeyStore], key_id: str, request_ids: list[str], threads_per_store: int):
    """Every thread writes every request id (in its own order); returns how many writes said 'new'."""
    def worker(store, seed):
        ids = list(request_ids)
        random.Random(seed).shuffle(ids)
        return sum(store.record_usage(key_id, "base", rid, 10 + i % 7, 3, i % 2) for i, rid in enumerate(ids))

    jobs = [(s, n) for s in stores for n in range(threads_per_store)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return sum(pool.map(lambda job: worker(*job), jobs))


def test_ledger_exactly_once_under_concurrent_threads(store):
    _, rec = store.create_key("busy")
    ids = [f"r{i}" for i in range(40)]
    assert _record_concurrently([store], rec.id, ids, threads_per_store=6) == len(ids)
    rows = ledger_rows(store)
    assert Counter(r["request_id"] for r in rows) == Counter(ids)
    [day] = rollup_rows(store)
    assert day["requests"] == len(ids)
    for c in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        assert day[c] == sum(r[c] for r in rows)


def test_daily_rollup_equals_ledger_sums(store):
    keys = [store.create_key(f"k{i}")[1] for i in range(2)]
    rng = random.Random(0)
    start = datetime(2025, 3, 30, 22, 0, tzinfo=timezone.utc)
    for i in range(60):
        at = start + timedelta(hours=rng.randrange(0, 72), minutes=rng.randrange(60))
        prompt = rng.randrange(1, 500)
        store.record_usage(rng.choice(keys).id, rng.choice(["base", "chat"]), f"q{i}", prompt,
                           rng.randrange(0, 200), rng.randrange(0, prompt + 1), at=at)
    ledger = ledger_rows(store)
    counts = ("prompt_tokens", "completion_tokens", "cached_tokens")
    expect: dict = {}
    for r in ledger:
        day = utc_day(r["created_at"])
        acc = expect.setdefault((r["key_id"], day, r["model"]), Counter())
        acc["requests"] += 1
        for c in counts:
            acc[c] += r[c]
    got = {(r["key_id"], r["day"], r["model"]): Counter({c: r[c] for c in ("requests", *counts)})
           for r in rollup_rows(store)}
    assert got == expect and len(got) > 6  # several days, models and keys
    by_key = {r["key_id"]: r for r in store.usage(by="key")}
    for k in keys:
        mine = [r for r in ledger if r["key_id"] == k.id]
        assert by_key[k.id]["name"] == k.name and by_key[k.id]["requests"] == len(mine)
        assert by_key[k.id]["prompt_tokens"] == sum(r["prompt_tokens"] for r in mine)
    by_day = store.usage(by="day", since=date(2025, 4, 1))
    assert {r["day"] for r in by_day} == {"2025-04-01", "2025-04-02"}
    assert sum(r["requests"] for r in by_day) == sum(1 for r in ledger if utc_day(r["created_at"]) >= date(2025, 4, 1))


def test_token_budget_via_tokens_used(store):
    _, rec = store.create_key("capped", token_budget=1000)
    _, other = store.create_key("other")
    assert store.tokens_used(rec.id) == 0 and store.budget_left(rec) == 1000
    store.record_usage(rec.id, "base", "a", 300, 200, 100)  # cached tokens are part of the prompt's 300
    store.record_usage(rec.id, "chat", "b", 400, 50, 0, at=datetime(2024, 1, 1, tzinfo=timezone.utc))
    store.record_usage(rec.id, "chat", "b", 400, 50, 0)  # retried: not charged twice
    store.record_usage(other.id, "base", "c", 9999, 1, 0)
    assert store.tokens_used(rec.id) == 950 and store.budget_left(rec) == 50
    store.record_usage(rec.id, "base", "d", 100, 0, 0)
    assert store.budget_left(rec) == 0 and store.budget_left(other) is None


# ----------------------------------------------------------------------------- PostgreSQL, two replicas

def test_two_stores_share_keys_and_one_ledger(pg_url):
    a, b = KeyStore(pg_url), KeyStore(pg_url)  # two replicas' stores on one database
    try:
        plaintext, record = a.create_key("shared", models=["base"], rpm=60)
        assert b.authenticate(plaintext) == record
        with pytest.raises(LmforgeError, match="live key named 'shared'"):
            b.create_key("shared")  # the unique index holds across replicas
        ids = [f"req-{i}" for i in range(50)]
        assert _record_concurrently([a, b], record.id, ids, threads_per_store=3) == len(ids)
        assert len(ledger_rows(a)) == len(ids)
        assert a.usage()[0]["requests"] == b.usage()[0]["requests"] == len(ids)
        b.revoke("shared")
        assert a.authenticate(plaintext) is None
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- rate limits

def test_requests_per_minute_sliding_window(limiter_and_clock):
    limiter, clock = limiter_and_clock
    t0 = clock.t
    for dt in (0, 10, 20):
        clock.t = t0 + dt
        assert limiter.acquire_request("k", 3) is None
    clock.t = t0 + 30
    assert limiter.acquire_request("k", 3) == pytest.approx(30)  # the t0 request leaves at t0 + 60
    assert limiter.acquire_request("other", 3) is None  # per key
    clock.t = t0 + 59.5
    assert limiter.acquire_request("k", 3) == pytest.approx(0.5)
    clock.t = t0 + 60
    assert limiter.acquire_request("k", 3) is None  # denied attempts were not counted
    assert limiter.acquire_request("k", 3) == pytest.approx(10)  # now waiting for the t0 + 10 one
    assert limiter.acquire_request("k", 1) == pytest.approx(60)  # a lower limit waits for the newest
    for _ in range(100):
        assert limiter.acquire_request("k", None) is None


def test_tokens_per_minute_hold_what_a_request_may_use_until_it_settles(limiter_and_clock):
    limiter, clock = limiter_and_clock
    t0 = clock.t
    assert limiter.reserve_tokens("k", 100, 60, "a") is None  # a may use 60: held now
    assert limiter.reserve_tokens("k", 100, 60, "b") == pytest.approx(60)  # 120 > 100 until a leaves at t0 + 60
    limiter.settle_tokens("k", "a", 20)  # a ended having used 20
    clock.t = t0 + 10
    assert limiter.reserve_tokens("k", 100, 60, "b") is None  # 20 + 60 fit; refused attempts were not held
    clock.t = t0 + 20
    assert limiter.reserve_tokens("k", 100, 30, "c") == pytest.approx(40)  # room once a (t0) leaves
    assert limiter.reserve_tokens("k", 100, 90, "c") == pytest.approx(50)  # room once b (t0 + 10) leaves too
    limiter.settle_tokens("k", "b", 0)  # b was refused downstream: it used nothing
    assert limiter.reserve_tokens("k", 100, 80, "c") is None  # 20 + 0 + 80
    assert limiter.reserve_tokens("k", 100, 1, "d") == pytest.approx(40)  # full (100) until a leaves
    assert limiter.reserve_tokens("other", 100, 100, "e") is None  # per key
    assert limiter.reserve_tokens("k", None, 10**6, "f") is None  # no limit: not counted
    clock.t = t0 + 200
    assert limiter.reserve_tokens("k", 100, 500, "g") is None  # an empty window admits any size
    clock.t = t0 + 210
    limiter.settle_tokens("k", "gone", 7)  # a reservation that expired while its request ran: counted now
    clock.t = t0 + 260  # g has left
    assert limiter.reserve_tokens("k", 100, 94, "h") == pytest.approx(10)  # 7 + 94 until t0 + 270
    assert limiter.reserve_tokens("k", 100, 93, "h") is None  # 7 + 93


def test_redis_limit_uses_the_servers_clock(redis_prefix):
    limiter = RedisRateLimiter(REDIS_URL, prefix=redis_prefix)  # no clock given: Redis TIME
    assert limiter.acquire_request("k", 2) is None and limiter.acquire_request("k", 2) is None
    assert 59 < limiter.acquire_request("k", 2) <= 60


def test_two_redis_limiters_share_one_limit(redis_prefix):
    """Two replicas' limiters, eight threads: the per-key limit holds for all of them together."""
    a = RedisRateLimiter(REDIS_URL, prefix=redis_prefix)
    b = RedisRateLimiter(REDIS_URL, prefix=redis_prefix)
    allowed = []
    lock = threading.Lock()

    def hammer(limiter):
        for _ in range(10):
            ok = limiter.acquire_request("shared", 15) is None
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=hammer, args=(lim,)) for lim in (a, b) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 80 and sum(allowed) == 15
    assert a.reserve_tokens("shared", 500, 400, "r1") is None
    assert b.reserve_tokens("shared", 500, 101, "r2") is not None  # a's reservation holds on b too
    a.settle_tokens("shared", "r1", 300)
    assert b.reserve_tokens("shared", 500, 200, "r2") is None and b.reserve_tokens("shared", 500, 1, "r3") is not None
    other_prefix = RedisRateLimiter(REDIS_URL, prefix=redis_prefix + "-x")
    assert other_prefix.acquire_request("shared", 15) is None  # prefixes keep namespaces apart


def test_make_rate_limiter():
    assert isinstance(make_rate_limiter(None), MemoryRateLimiter)
    assert isinstance(make_rate_limiter("memory"), MemoryRateLimiter)
    with pytest.raises(LmforgeError, match="rate-limit store 'http://x'"):
        make_rate_limiter("http://x")
    with pytest.raises(LmforgeError, match="cannot reach Redis"):
        make_rate_limiter("redis://127.0.0.1:1/0")
    if redis_answers():
        assert isinstance(make_rate_limiter(REDIS_URL, prefix="lmforge-test:unused"), RedisRateLimiter)


# ----------------------------------------------------------------------------- the command line

def one_line_error(capsys, argv, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert match in err, err


def test_cli_keys_and_usage_round_trip(tmp_path, monkeypatch, capsys):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("LMFORGE_DB", db)
    assert main(["keys", "create", "--name", "team-a", "--models", "base,chat", "--rpm", "60", "--tpm", "20000"]) == 0
    out, err = capsys.readouterr()
    plaintext = out.strip()
    assert parse_key(plaintext) is not None and "not be shown again" in err
    store = KeyStore(db)
    record = store.authenticate(plaintext)
    assert isinstance(record, KeyRecord) and record.models == ["base", "chat"] and (record.rpm, record.tpm) == (60,
                                                                                                             20000)
    assert main(["keys", "create", "--name", "ops", "--admin", "--budget", "5000", "--db", db]) == 0
    ops_plain = capsys.readouterr().out.strip()
    assert store.authenticate(ops_plain).admin

    store.record_usage(record.id, "base", "r1", 1000, 200, 512)
    store.record_usage(record.id, "chat", "r2", 100, 20, 0)
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "team-a" in listing and f"lmf-{record.id}-" in listing and "1,320" in listing  # tokens used
    assert parse_key(plaintext)[1] not in listing and parse_key(ops_plain)[1] not in listing

    assert main(["usage"]) == 0
    table = capsys.readouterr().out
    team_line = next(line for line in table.splitlines() if line.startswith("team-a"))
    assert team_line.split()[1:] == ["2", "1,100", "220", "512"]  # requests, input, completion, cached
    assert main(["usage", "--by", "day", "--db", db]) == 0
    assert datetime.now(timezone.utc).date().isoformat() in capsys.readouterr().out

    assert main(["keys", "revoke", "team-a"]) == 0
    capsys.readouterr()
    assert store.authenticate(plaintext) is None
    assert main(["keys", "list"]) == 0
    assert "team-a" not in capsys.readouterr().out
    assert main(["keys", "list", "--all"]) == 0
    assert "team-a" in capsys.readouterr().out
    store.close()


def test_cli_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMFORGE_DB", f"sqlite:///{tmp_path / 'cli.db'}")
    assert main(["keys", "create", "--name", "a"]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["keys", "create", "--name", "a"], "a live key named 'a' exists")
    one_line_error(capsys, ["keys", "revoke", "nobody"], "no live key named 'nobody'")
    one_line_error(capsys, ["keys", "create", "--name", "b", "--rpm", "-1"], "--rpm -1")
    one_line_error(capsys, ["usage", "--since", "last-week"], "YYYY-MM-DD")
    one_line_error(capsys, ["usage", "--db", "not a url"], "not a SQLAlchemy URL")
    one_line_error(capsys, ["keys", "list", "--db", "postgresql://postgres@127.0.0.1:1/test"], "cannot open")
