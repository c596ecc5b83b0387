"""Shared fixtures: a small corpus made on the spot, its tokenizer and token shards."""

import os
import random
import sysconfig
import uuid
from pathlib import Path

import hypothesis
import pytest
import sqlalchemy as sa

from lmforge.corpus import Corpus
from lmforge.prepare import prepare_data

# CI (CI=true): Hypothesis draws the same examples every run and keeps no example database, so a
# submission's result does not depend on the draw; locally it explores anew each run.
if os.environ.get("CI"):
    hypothesis.settings.register_profile("ci", derandomize=True, database=None)
    hypothesis.settings.load_profile("ci")


def write_small_corpus(folder: Path, num_files: int = 120) -> Path:
    """A few hundred KB of real Python: this interpreter's first stdlib modules, renamed so ids differ."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.glob("*.py"))[:num_files]
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i, p in enumerate(sources):
        text = p.read_text(encoding="utf-8", errors="replace")[:6000]
        (folder / f"doc_{i:03d}_{rng.randrange(10**6)}.py").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, small_corpus) -> Path:
    """Token shards (vocab 320) of the small corpus, with a held-out split."""
    out = tmp_path_factory.mktemp("data")
    prepare_data(Corpus(str(small_corpus)), out, vocab_size=320, progress=False)
    return out


# ----------------------------------------------------------------------------- PostgreSQL and Redis
# Tests of the multi-replica paths use the machine's services; where one does not answer they skip.

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def pg_answers() -> bool:
    try:
        import psycopg

        psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=2).close()
        return True
    except Exception:
        return False


def redis_answers() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_available() -> bool:
    return pg_answers()


@pytest.fixture()
def pg_url(pg_available):
    """A database URL whose search_path is a fresh schema, so tests never see each other's (or real) tables."""
    if not pg_available:
        pytest.skip("PostgreSQL does not answer at 127.0.0.1:5432")
    schema = f"lmforge_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_SERVER)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Each test that takes it runs twice: on SQLite in tmp_path, and on PostgreSQL (skipped if absent)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture()
def redis_prefix():
    if not redis_answers():
        pytest.skip("Redis does not answer at 127.0.0.1:6379")
    import redis

    prefix = f"lmforge-test:{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):  # also the "-x" prefix one test adds
        client.delete(key)
