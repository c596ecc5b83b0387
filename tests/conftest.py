"""Shared fixtures: a small corpus made on the spot, its tokenizer and token shards."""

import random
import sysconfig
from pathlib import Path

import pytest

from lmforge.corpus import Corpus
from lmforge.prepare import prepare_data


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
