"""API keys, authorisation, rate limits and the usage ledger for the OpenAI-compatible server.

Three pieces, each usable alone:

- `KeyStore(url)`: keys and the usage ledger in one SQL database through SQLAlchemy. SQLite by
  default (`~/.lmforge/lmforge.db`); a PostgreSQL URL lets several server replicas share keys
  and one ledger. The database holds a salt and a hash per key, never the key itself.
- `RateLimiter`: requests/minute and tokens/minute over a sliding 60 s window, in this
  process's memory or in Redis (shared by replicas), behind one interface.
- `is_admin` / `env_admin_key`: the admin check, including an admin key that lives only in the
  environment (`LMFORGE_ADMIN_KEY`), so a fresh deployment can manage keys over the API before
  any key exists in the database.

A key reads `lmf-<key_id>-<secret>`. The key id is a public handle (it is shown by
`lmforge keys list` and stored in plain text to find the row); the secret is 256 random bits.
Nothing in this module logs a key or puts one in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from lmforge.common import LmforgeError

KEY_PREFIX = "lmf"
KEY_ID_HEX = 12  # 48 bits: collisions are checked on insert anyway, this just keeps retries rare
SECRET_BYTES = 32  # 256 bits, as token_urlsafe: 43 characters of [A-Za-z0-9_-]
SALT_BYTES = 16
# key_id is hex (no '-'); the secret may contain '-' and '_', so it is everything after the second '-'.
_KEY_RE = re.compile(rf"^{KEY_PREFIX}-([0-9a-f]{{8,64}})-([A-Za-z0-9_-]{{32,128}})$")
WINDOW_SECONDS = 60.0  # rpm and tpm are per minute, over a sliding window (not a fixed clock minute)


# ----------------------------------------------------------------------------- keys and hashes

def _hash_secret(salt: bytes, secret: str) -> str:
    """sha256(salt || secret), hex.

    A fast hash is right here, unlike for passwords: the secret is 256 random bits, so even a
    stolen table cannot be brute-forced at any hash speed, and a slow KDF (bcrypt, scrypt) would
    cost ~100 ms of CPU on every API request. The per-key salt means two tables, or two keys,
    never share a hash, and no precomputed table applies.
    """
    return hashlib.sha256(salt + secret.encode()).hexdigest()


def parse_key(plaintext: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    m = _KEY_RE.match(plaintext or "")
    return (m.group(1), m.group(2)) if m else None


@dataclass(frozen=True)
class KeyRecord:
    """A key as the server sees it. Carries no secret material (no salt, no hash), so it is safe
    to log, return from the admin API or keep in memory."""
    id: str  # the public key id: `lmf-<id>-...`
    name: str
    models: list[str] | None  # None: every served model
    rpm: int | None  # requests per minute; None: unlimited
    tpm: int | None  # prompt + completion tokens per minute; None: unlimited
    token_budget: int | None  # prompt + completion tokens over the key's lifetime; None: unlimited
    admin: bool
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def prefix(self) -> str:
        """What a listing shows in place of the key: enough to recognise it, useless to call with."""
        return f"{KEY_PREFIX}-{self.id}-..."

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def env_admin_key(env: dict | None = None) -> str | None:
    """The admin key from `LMFORGE_ADMIN_KEY`, checked for strength; None when unset.

    The server calls this once at start-up, so a weak value fails there, not on a request.
    """
    value = (os.environ if env is None else env).get("LMFORGE_ADMIN_KEY")
    if not value:
        return None
    if len(value) < 32:
        raise LmforgeError(f"LMFORGE_ADMIN_KEY is {len(value)} characters; use at least 32 random ones, e.g. "
                           "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`, or create a stored "
                           "admin key with `lmforge keys create --name admin --admin`")
    return value


def is_admin(plaintext: str, record: KeyRecord | None, env: dict | None = None) -> bool:
    """May this caller manage keys? Yes for a live stored admin key (`record` is what
    `KeyStore.authenticate(plaintext)` returned) or for the environment's `LMFORGE_ADMIN_KEY`.

    The environment key never enters the database; it is compared in constant time here.
    """
    if record is not None and record.admin and not record.revoked:
        return True
    admin_key = env_admin_key(env)
    return admin_key is not None and hmac.compare_digest(plaintext.encode(), admin_key.encode())


# ----------------------------------------------------------------------------- the database

def default_db_url() -> str:
    """`LMFORGE_DB` if set, else SQLite at `<LMFORGE_HOME or ~/.lmforge>/lmforge.db` (folder made)."""
    if os.environ.get("LMFORGE_DB"):
        return os.environ["LMFORGE_DB"]
    home = Path(os.environ.get("LMFORGE_HOME") or Path.home() / ".lmforge")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)  # the key hashes and the ledger: the user's alone
    return f"sqlite:///{home / 'lmforge.db'}"


metadata = sa.MetaData()

keys_table = sa.Table(
    "lmforge_keys", metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("salt", sa.String(2 * SALT_BYTES), nullable=False),  # hex
    sa.Column("secret_hash", sa.String(64), nullable=False),  # hex sha256(salt || secret)
    sa.Column("models", sa.JSON, nullable=True),  # list of names; NULL: every model
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
    sa.Column("token_budget", sa.BigInteger, nullable=True),
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    # Names are unique among live keys only, so a revoked name can be reused. A partial index
    # makes the database enforce it, which holds across replicas where a check-then-insert would not.
    sa.Index("lmforge_keys_live_name", "name", unique=True,
             sqlite_where=sa.text("revoked_at IS NULL"), postgresql_where=sa.text("revoked_at IS NULL")),
)

ledger_table = sa.Table(
    "lmforge_usage", metadata,  # one row per request
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    # UNIQUE: a retried write (client retry, replica failover) of the same request counts once.
    sa.Column("request_id", sa.String(128), nullable=False, unique=True),
    sa.Column("key_id", sa.String(64), nullable=False, index=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cached_tokens", sa.Integer, nullable=False),  # part of prompt_tokens, as in OpenAI's usage
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

daily_table = sa.Table(
    "lmforge_usage_daily", metadata,  # the ledger rolled up per key, UTC day and model
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False),
)

reservations_table = sa.Table(
    "lmforge_budget_reservations", metadata,  # tokens held against a key's budget by requests in flight
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("key_id", sa.String(64), nullable=False, index=True),
    sa.Column("tokens", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens")
# A reservation whose request never settled (its replica was killed) stops holding tokens after this.
RESERVATION_TTL_SECONDS = 3600


def _utc(t: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored here is UTC.
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise LmforgeError(f"{name} {value!r}: must be a whole number of at least 1, or left out for no limit")


class KeyStore:
    """Keys and the usage ledger in one SQL database.

    `url` is any SQLAlchemy URL; None means `default_db_url()`. SQLite and PostgreSQL are
    supported (the ledger uses their upserts), e.g. `postgresql+psycopg://postgres@127.0.0.1:5432/test`.
    Tables are created on open. Safe to share between threads: each call takes a pooled connection.
    """

    def __init__(self, url: str | None = None):
        url = url or default_db_url()
        try:
            parsed = sa.engine.make_url(url)
        except sa_exc.ArgumentError:
            raise LmforgeError(f"database URL {url!r} is not a SQLAlchemy URL; use e.g. sqlite:///path/lmforge.db "
                               "or postgresql+psycopg://user@host:5432/dbname") from None
        if parsed.drivername == "postgresql":
            # SQLAlchemy's default PostgreSQL driver is psycopg2; the one lmforge depends on is psycopg 3.
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise LmforgeError(f"database URL {parsed.render_as_string()!r}: {self.dialect} is not supported; "
                               "use sqlite:///... or postgresql+psycopg://...")
        self.url = parsed.render_as_string(hide_password=True)  # for messages: never the password
        kwargs: dict = {"pool_pre_ping": True}  # a replica outlives database restarts
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                _private_sqlite_file(Path(parsed.database).expanduser(), self.url)
            # Threads wait up to 30 s for SQLite's single writer lock instead of failing at once.
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails, not hangs
        try:
            self.engine = sa.create_engine(parsed, **kwargs)
        except ImportError as e:
            raise LmforgeError(f"database URL {self.url!r} needs a driver that is not installed ({e.name}); "
                               "for PostgreSQL: pip install 'psycopg[binary]'") from None
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.create_tables(metadata)
        self._insert = sqlite.insert if self.dialect == "sqlite" else postgresql.insert

    def create_tables(self, tables: sa.MetaData) -> None:
        """Create the tables of `tables` that do not exist yet (other modules keep their own tables,
        e.g. feedback.py's stored responses, in this database through this call)."""
        try:
            with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    # Replicas starting together would race to CREATE TABLE; DDL is transactional in
                    # PostgreSQL, so one transaction-scoped lock serialises them.
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7240818)"))
                tables.create_all(conn)
        except sa_exc.DBAPIError as e:
            raise LmforgeError(f"cannot open the database {self.url!r}: {str(e.orig).strip().splitlines()[0]}; "
                               "check the URL (--db or LMFORGE_DB) and that the server is running") from None

    def close(self) -> None:
        self.engine.dispose()

    # -- keys ---------------------------------------------------------------------------------

    def create_key(self, name: str, models: list[str] | None = None, rpm: int | None = None,
                   tpm: int | None = None, token_budget: int | None = None,
                   admin: bool = False) -> tuple[str, KeyRecord]:
        """A new key: (the plaintext, shown to the user once and kept nowhere, its record)."""
        name = (name or "").strip()
        if not name or len(name) > 100:
            raise LmforgeError(f"key name {name!r}: give a name of 1 to 100 characters, e.g. --name team-a")
        if models is not None:
            models = list(dict.fromkeys(m.strip() for m in models if m.strip()))
            if not models:
                raise LmforgeError("--models is empty; list model names (base,chat) or leave it out to allow "
                                   "every model")
        for label, value in (("--rpm", rpm), ("--tpm", tpm), ("--budget", token_budget)):
            _positive(label, value)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        salt = secrets.token_bytes(SALT_BYTES)
        record = KeyRecord(id=secrets.token_hex(KEY_ID_HEX // 2), name=name, models=models, rpm=rpm, tpm=tpm,
                           token_budget=token_budget, admin=bool(admin), created_at=datetime.now(timezone.utc))
        row = {"key_id": record.id, "name": name, "salt": salt.hex(), "secret_hash": _hash_secret(salt, secret),
               "models": models, "rpm": rpm, "tpm": tpm, "token_budget": token_budget, "admin": record.admin,
               "created_at": record.created_at, "revoked_at": None}
        try:
            with self.engine.begin() as conn:
                conn.execute(keys_table.insert().values(**row))
        except sa_exc.IntegrityError:
            # `from None`: SQLAlchemy's message carries the statement's parameters (salt, hash).
            if self._live(name) is not None:
                raise LmforgeError(f"a live key named {name!r} exists; pick another name or "
                                   f"`lmforge keys revoke {name}` first") from None
            raise  # a key-id collision (48 random bits): not the user's doing, and never expected
        return f"{KEY_PREFIX}-{record.id}-{secret}", record

    def authenticate(self, plaintext: str) -> KeyRecord | None:
        """The live key this plaintext is, or None (malformed, unknown, wrong secret, revoked)."""
        parsed = parse_key(plaintext)
        if parsed is None:
            return None
        key_id, secret = parsed
        with self.engine.connect() as conn:
            row = conn.execute(keys_table.select().where(keys_table.c.key_id == key_id)).mappings().first()
        # The key id is public (listed, logged), so the lookup's timing reveals nothing secret; the
        # secret itself is compared in constant time.
        if row is None or not hmac.compare_digest(_hash_secret(bytes.fromhex(row["salt"]), secret),
                                                  row["secret_hash"]):
            return None
        record = _record(row)
        return None if record.revoked else record

    def get_key(self, name: str) -> KeyRecord:
        record = self._live(name)
        if record is None:
            raise LmforgeError(f"no live key named {name!r}; `lmforge keys list` shows the names")
        return record

    def revoke(self, name: str) -> KeyRecord:
        """Revoke the live key called `name`; it stops working on every replica at its next request."""
        now = datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            result = conn.execute(keys_table.update().where(keys_table.c.name == name,
                                                            keys_table.c.revoked_at.is_(None))
                                  .values(revoked_at=now).returning(*keys_table.c))
            row = result.mappings().first()
        if row is None:
            raise LmforgeError(f"no live key named {name!r}; `lmforge keys list` shows the names")
        return _record(row)

    def list_keys(self, include_revoked: bool = False) -> list[KeyRecord]:
        query = keys_table.select().order_by(keys_table.c.created_at, keys_table.c.name)
        if not include_revoked:
            query = query.where(keys_table.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query).mappings()]

    def _live(self, name: str) -> KeyRecord | None:
        query = keys_table.select().where(keys_table.c.name == name, keys_table.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _record(row)

    # -- the ledger ---------------------------------------------------------------------------

    def record_usage(self, key_id: str, model: str, request_id: str, prompt_tokens: int, completion_tokens: int,
                     cached_tokens: int = 0, at: datetime | None = None) -> bool:
        """One ledger row for a finished request, and its day's rollup, in one transaction.

        False (and nothing changes) when `request_id` is already in the ledger, so a retried
        write, from this replica or another, counts once. `at` defaults to now (UTC).
        """
        assert min(prompt_tokens, completion_tokens, cached_tokens) >= 0 and cached_tokens <= prompt_tokens
        at = _utc(at) or datetime.now(timezone.utc)
        at = at.astimezone(timezone.utc)
        counts = {"requests": 1, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "cached_tokens": cached_tokens}
        ledger = self._insert(ledger_table).values(
            request_id=request_id, key_id=key_id, model=model, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, cached_tokens=cached_tokens, created_at=at,
        ).on_conflict_do_nothing(index_elements=["request_id"]).returning(ledger_table.c.id)
        rollup = self._insert(daily_table).values(key_id=key_id, day=at.date(), model=model, **counts)
        # Add to the row in the database (`requests = requests + 1`), not read-modify-write in
        # Python: concurrent replicas then cannot lose each other's increments.
        rollup = rollup.on_conflict_do_update(
            index_elements=["key_id", "day", "model"],
            set_={c: daily_table.c[c] + rollup.excluded[c] for c in _COUNTS})
        with self.engine.begin() as conn:
            # The request's budget reservation (if any) goes in the same transaction as its use: at no
            # moment are its tokens counted twice, or not at all.
            conn.execute(reservations_table.delete().where(reservations_table.c.request_id == request_id))
            # A row comes back only if one was inserted. Not `rowcount`: psycopg reports -1
            # (unknown) for this statement on PostgreSQL, inserted or not.
            if conn.execute(ledger).first() is None:  # request_id seen before: the conflict did nothing
                return False
            conn.execute(rollup)
        return True

    def reserve_budget(self, record: KeyRecord, request_id: str, tokens: int) -> int | None:
        """Hold `tokens` (the most a request may use) against the key's lifetime budget before it runs:
        None when held, else the tokens the key could still reserve (the request is refused).

        Checking what was used and only then running let every request admitted meanwhile through,
        so concurrent requests overshot the budget together. Used + held + this <= budget is checked
        and the hold written in one transaction that first takes a lock on the key's row (an UPDATE
        that changes nothing: a row lock on PostgreSQL, the write lock on SQLite), so replicas
        serialise on it. record_usage replaces the hold with what was used; release_budget drops it."""
        if record.token_budget is None:
            return None
        now = datetime.now(timezone.utc)
        stale = datetime.fromtimestamp(now.timestamp() - RESERVATION_TTL_SECONDS, timezone.utc)
        held = reservations_table.c
        with self.engine.begin() as conn:
            conn.execute(keys_table.update().where(keys_table.c.key_id == record.id)
                         .values(key_id=keys_table.c.key_id))
            conn.execute(reservations_table.delete().where(held.key_id == record.id, held.created_at < stale))
            used = conn.execute(_tokens_used(record.id)).scalar_one()
            reserved = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(held.tokens), 0))
                                    .where(held.key_id == record.id)).scalar_one()
            left = record.token_budget - int(used) - int(reserved)
            if tokens > left:
                return max(0, left)
            conn.execute(reservations_table.insert().values(request_id=request_id, key_id=record.id, tokens=tokens,
                                                            created_at=now))
        return None

    def release_budget(self, request_id: str) -> None:
        """Drop a request's hold on its key's budget (it was refused, or failed before using anything)."""
        with self.engine.begin() as conn:
            conn.execute(reservations_table.delete().where(reservations_table.c.request_id == request_id))

    def tokens_used(self, key_id: str) -> int:
        """Prompt + completion tokens over the key's lifetime (what `token_budget` limits)."""
        with self.engine.connect() as conn:
            return int(conn.execute(_tokens_used(key_id)).scalar_one())

    def budget_left(self, record: KeyRecord) -> int | None:
        """Tokens the key has not used; None without a budget. (Admission holds what each request may use
        with reserve_budget, so requests in flight cannot overshoot the budget together.)"""
        if record.token_budget is None:
            return None
        return max(0, record.token_budget - self.tokens_used(record.id))

    def usage(self, by: str = "key", since: date | None = None) -> list[dict]:
        """Usage rows from the daily rollup: by "key" (one row per key), "day" (per day and key) or
        "model" (per key and model), each with requests, prompt/completion/cached tokens."""
        groups = {"key": [], "day": [daily_table.c.day], "model": [daily_table.c.model]}
        if by not in groups:
            raise LmforgeError(f"usage by {by!r}: choose key, day or model")
        name = sa.func.coalesce(sa.func.max(keys_table.c.name), daily_table.c.key_id).label("name")
        columns = [*groups[by], daily_table.c.key_id, name, *(sa.func.sum(daily_table.c[c]).label(c) for c in _COUNTS)]
        query = (sa.select(*columns)
                 # A name is reused after a revoke, so the id is the grouping, and the name the label.
                 .select_from(daily_table.outerjoin(keys_table, keys_table.c.key_id == daily_table.c.key_id))
                 .group_by(*groups[by], daily_table.c.key_id)
                 .order_by(*groups[by], name))
        if since is not None:
            query = query.where(daily_table.c.day >= since)
        with self.engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        for row in rows:
            for c in _COUNTS:
                row[c] = int(row[c])  # PostgreSQL's SUM of bigint is numeric
            if "day" in row:
                row["day"] = row["day"].isoformat()
        return rows


def _private_sqlite_file(path: Path, url: str) -> None:
    """Make a new SQLite database's folder (0700) and file (0600) private to this user before SQLite
    opens it: it holds the key hashes, the ledger and stored responses. SQLite gives its -wal and
    -shm files the database file's permissions. Existing files and folders are left as they are."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as e:
        raise LmforgeError(f"database URL {url!r}: cannot make {path} ({e.strerror}); pick a writable "
                           "path") from None


def _tokens_used(key_id: str) -> sa.Select:
    total = sa.func.coalesce(sa.func.sum(daily_table.c.prompt_tokens + daily_table.c.completion_tokens), 0)
    return sa.select(total).where(daily_table.c.key_id == key_id)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL: readers (authenticate) do not wait behind the ledger's writer. NORMAL sync is SQLite's
    # advice for WAL: no corruption on power loss, at worst the last commits lost, and no fsync per request.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _record(row) -> KeyRecord:
    return KeyRecord(id=row["key_id"], name=row["name"], models=row["models"], rpm=row["rpm"], tpm=row["tpm"],
                     token_budget=row["token_budget"], admin=bool(row["admin"]),
                     created_at=_utc(row["created_at"]), revoked_at=_utc(row["revoked_at"]))


# ----------------------------------------------------------------------------- rate limits

class RateLimiter:
    """Requests/minute and tokens/minute per key over a sliding 60 s window.

    - `acquire_request(key_id, rpm)`: None if allowed (and counted), else seconds until a slot
      frees (for Retry-After).
    - `reserve_tokens(key_id, tpm, n, reservation)`: before admitting a request that may use up to
      n tokens (its prompt plus max_tokens per choice): None if the window has room for all n (and
      they are counted now, under the id `reservation`), else seconds until it will. Counting the
      most a request may use, as OpenAI's limits do, keeps concurrent requests from overshooting
      together: checking the window and adding tokens only after each request ended let every
      request admitted meanwhile through. A window holding nothing admits any n.
    - `settle_tokens(key_id, reservation, n)`: once the request ends, what it used (n, from 0 for a
      refused one up to the reserved count) replaces the reservation, at the reservation's time.

    A limit of None means unlimited and is not counted.
    """

    def acquire_request(self, key_id: str, rpm: int | None) -> float | None:
        raise NotImplementedError

    def reserve_tokens(self, key_id: str, tpm: int | None, n: int, reservation: str) -> float | None:
        raise NotImplementedError

    def settle_tokens(self, key_id: str, reservation: str, n: int) -> None:
        raise NotImplementedError


class MemoryRateLimiter(RateLimiter):
    """Counts in this process: right for one server process, wrong for replicas (use Redis).

    `clock` (seconds, monotonic) is injectable so tests move time without sleeping.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()  # the server calls from a thread pool
        self._requests: dict[str, deque[float]] = {}  # key -> request times, oldest first
        self._tokens: dict[str, deque[list]] = {}  # key -> [time, tokens, reservation], oldest first
        self._token_sums: dict[str, int] = {}

    def _expire(self, key_id: str, now: float) -> None:
        # An event at t counts while now - t < 60; Redis's ZREMRANGEBYSCORE(-inf, now - 60) agrees.
        cutoff = now - WINDOW_SECONDS
        requests = self._requests.get(key_id)
        while requests and requests[0] <= cutoff:
            requests.popleft()
        tokens = self._tokens.get(key_id)
        while tokens and tokens[0][0] <= cutoff:
            self._token_sums[key_id] -= tokens.popleft()[1]

    def acquire_request(self, key_id: str, rpm: int | None) -> float | None:
        if rpm is None:
            return None
        with self._lock:
            now = self.clock()
            self._expire(key_id, now)
            times = self._requests.setdefault(key_id, deque())
            if len(times) < rpm:
                times.append(now)
                return None
            return times[len(times) - rpm] + WINDOW_SECONDS - now  # when enough old ones have left

    def reserve_tokens(self, key_id: str, tpm: int | None, n: int, reservation: str) -> float | None:
        if tpm is None:
            return None
        with self._lock:
            now = self.clock()
            self._expire(key_id, now)
            entries = self._tokens.setdefault(key_id, deque())
            total = self._token_sums.get(key_id, 0)
            if total + n <= tpm or not entries:
                entries.append([now, n, reservation])
                self._token_sums[key_id] = total + n
                return None
            for t, used, _ in entries:  # oldest first: the wait is until the rest leaves room for n
                total -= used
                if total + n <= tpm:
                    return t + WINDOW_SECONDS - now
            return entries[-1][0] + WINDOW_SECONDS - now  # n > tpm: only an empty window admits it

    def settle_tokens(self, key_id: str, reservation: str, n: int) -> None:
        with self._lock:
            now = self.clock()
            self._expire(key_id, now)
            for entry in self._tokens.get(key_id, ()):
                if entry[2] == reservation:
                    self._token_sums[key_id] += n - entry[1]
                    entry[1] = n
                    return
            if n > 0:  # the reservation left the window while the request ran: count the use now
                self._tokens.setdefault(key_id, deque()).append([now, n, reservation])
                self._token_sums[key_id] = self._token_sums.get(key_id, 0) + n


# Each script runs atomically in Redis, so replicas cannot both take the last slot. Time is Redis's
# own clock (TIME) unless the caller passes one: one clock for every replica, whatever their skew.
# Results go back as strings because Redis truncates Lua numbers to integers.
_LUA_NOW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
"""

_LUA_ACQUIRE = _LUA_NOW + """
local limit = tonumber(ARGV[3])
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  return false
end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""

# Token entries are members "<tokens>:<reservation>" scored by time, so equal counts stay distinct.
_LUA_RESERVE_TOKENS = _LUA_NOW + """
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local total = 0
for i = 1, #entries, 2 do total = total + tonumber(string.match(entries[i], '^(%d+):')) end
local limit, n = tonumber(ARGV[3]), tonumber(ARGV[4])
if total + n <= limit or #entries == 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. ARGV[5])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  return false
end
for i = 1, #entries, 2 do
  total = total - tonumber(string.match(entries[i], '^(%d+):'))
  if total + n <= limit then return tostring(tonumber(entries[i + 1]) + window - now) end
end
return tostring(tonumber(entries[#entries]) + window - now)
"""

_LUA_SETTLE_TOKENS = _LUA_NOW + """
local suffix = ':' .. ARGV[4]
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local at = nil
for i = 1, #entries, 2 do
  if string.sub(entries[i], -#suffix) == suffix then
    at = entries[i + 1]
    redis.call('ZREM', KEYS[1], entries[i])
  end
end
if at == nil then
  if tonumber(ARGV[3]) == 0 then return false end
  at = now
end
redis.call('ZADD', KEYS[1], at, ARGV[3] .. suffix)
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return false
"""


class RedisRateLimiter(RateLimiter):
    """Counts in Redis, shared by every replica that uses the same URL and prefix.

    One sorted set per key and kind (`<prefix>:<key_id>:requests`, `...:tokens`), scored by time,
    trimmed to the window and expiring when idle. `clock=None` uses Redis's clock; tests pass one.
    Redis errors are raised to the caller (the server answers 503), not swallowed into "allowed".
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "lmforge:ratelimit",
                 clock: Callable[[], float] | None = None, connect_timeout_s: float = 5.0):
        import redis

        self.prefix = prefix
        self.clock = clock
        try:
            self.client = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                               socket_timeout=connect_timeout_s)
            self.client.ping()
        except (ValueError, redis.RedisError) as e:
            raise LmforgeError(f"cannot reach Redis at {url!r} ({e}); check the URL and that Redis is running, "
                               "or leave it out to count limits in this process") from None
        self._acquire = self.client.register_script(_LUA_ACQUIRE)
        self._reserve_tokens = self.client.register_script(_LUA_RESERVE_TOKENS)
        self._settle_tokens = self.client.register_script(_LUA_SETTLE_TOKENS)

    def _now(self) -> str:
        return "" if self.clock is None else repr(float(self.clock()))

    def _result(self, value) -> float | None:
        return None if value is None else float(value)

    def acquire_request(self, key_id: str, rpm: int | None) -> float | None:
        if rpm is None:
            return None
        return self._result(self._acquire(keys=[f"{self.prefix}:{key_id}:requests"],
                                          args=[self._now(), WINDOW_SECONDS, rpm, uuid.uuid4().hex]))

    def reserve_tokens(self, key_id: str, tpm: int | None, n: int, reservation: str) -> float | None:
        if tpm is None:
            return None
        return self._result(self._reserve_tokens(keys=[f"{self.prefix}:{key_id}:tokens"],
                                                 args=[self._now(), WINDOW_SECONDS, tpm, int(n), reservation]))

    def settle_tokens(self, key_id: str, reservation: str, n: int) -> None:
        self._settle_tokens(keys=[f"{self.prefix}:{key_id}:tokens"],
                            args=[self._now(), WINDOW_SECONDS, int(n), reservation])


def make_rate_limiter(url: str | None = None, prefix: str = "lmforge:ratelimit",
                      clock: Callable[[], float] | None = None) -> RateLimiter:
    """None or "memory": this process only. A redis://, rediss:// or unix:// URL: shared by replicas."""
    if url is None or url == "memory":
        return MemoryRateLimiter() if clock is None else MemoryRateLimiter(clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRateLimiter(url, prefix=prefix, clock=clock)
    raise LmforgeError(f"rate-limit store {url!r}: use redis://host:6379/0 (shared by replicas) or leave it out "
                       "to count in this process")
