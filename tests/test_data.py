"""Corpus reading, the held-out split, token shards and the resumable loader."""

import gzip
import json
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.corpus import Corpus, is_heldout
from lmforge.data import DataLoader, ShardWriter, TokenStream, read_meta


def test_heldout_split_is_deterministic_and_about_two_percent():
    ids = [f"stdlib/pkg/module_{i}.py" for i in range(20000)]
    first = [is_heldout(i) for i in ids]
    assert first == [is_heldout(i) for i in ids]
    assert 0.015 < sum(first) / len(ids) < 0.025


def test_default_corpus_has_stdlib_code_and_pydoc_topics():
    docs = Corpus("stdlib", max_bytes=200_000).documents()
    first = next(docs)
    assert first.id.startswith("stdlib/") and first.id.endswith(".py")
    from pydoc_data.topics import topics

    assert len(topics) > 50 and "pydoc/" + sorted(topics)[0] in {d.id for d in Corpus("stdlib").documents()}


def test_user_corpus_counts_every_skipped_input(tmp_path):
    (tmp_path / "good.txt").write_text("hello world\n")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    lines = [json.dumps({"text": "first doc"}), "{not json", json.dumps({"title": "no text"}), json.dumps({"text": ""}),
             json.dumps({"text": "second doc"})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "truncated.jsonl.gz", "wb") as f:
        f.write((json.dumps({"text": "kept before the cut"}) + "\n").encode() * 50)
    data = (tmp_path / "truncated.jsonl.gz").read_bytes()
    (tmp_path / "truncated.jsonl.gz").write_bytes(data[: len(data) // 2])

    corpus = Corpus(str(tmp_path))
    docs = list(corpus.documents())
    texts = [d.text for d in docs]
    assert "hello world\n" in texts and "first doc" in texts and "second doc" in texts
    assert docs[[d.text for d in docs].index("second doc")].id == "docs.jsonl:5"
    assert corpus.skipped == {"binary": 1, "invalid utf-8": 1, "empty": 2, "not a text file type": 1,
                              "malformed jsonl line": 2, "unreadable": 1}


def test_a_file_or_jsonl_line_over_the_cap_is_skipped_unread_gzip_bomb_included(tmp_path):
    cap, mib = 1 << 20, bytes(1 << 20)
    (tmp_path / "big.txt").write_bytes(b"a" * (cap + 1))
    (tmp_path / "small.txt").write_text("small file")
    with open(tmp_path / "long.jsonl", "wb") as f:  # a 50 MB line of one string between two good lines
        f.write(b'{"text": "before"}\n{"text": "' + b"a" * (50 << 20) + b'"}\n{"text": "after"}\n')
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 200 MB of zeros in one line, ~200 KB compressed
    bomb = [packer.compress(b'{"text": "')] + [packer.compress(mib) for _ in range(200)]
    (tmp_path / "bomb.jsonl.gz").write_bytes(b"".join(bomb) + packer.compress(b'"}\n{"text": "past the bomb"}\n')
                                             + packer.flush())
    corpus = Corpus(str(tmp_path), max_document_bytes=cap)
    tracemalloc.start()
    try:
        docs = {d.id: d.text for d in corpus.documents()}
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert docs == {"bomb.jsonl.gz:2": "past the bomb", "long.jsonl:1": "before", "long.jsonl:3": "after",
                    "small.txt": "small file"}
    assert corpus.skipped == {"too large": 3}
    assert peak_bytes < cap + (16 << 20), f"{peak_bytes:,} bytes at the peak"


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        Corpus(str(tmp_path / "nope"))


def test_shards_round_trip_documents_with_bos(tmp_path):
    w = ShardWriter(tmp_path, "train", bos_id=7, vocab_size=100, shard_tokens=10)
    docs = [[1, 2, 3], [4, 5, 6, 8, 9], [10], [11, 12, 13, 14, 15, 16, 17]]
    for d in docs:
        w.add(d)
    info = w.close()
    assert info["num_tokens"] == sum(len(d) + 1 for d in docs) and info["num_shards"] == 2
    stream = TokenStream(tmp_path, "train")
    expected = [t for d in docs for t in [7, *d]]
    assert stream.all().tolist() == expected
    assert stream.read(3, 12).tolist() == expected[3:12]  # across the shard boundary
    assert np.load(tmp_path / "train_0000.npy").dtype == np.uint16


def _stream(tmp_path, n=5000):
    w = ShardWriter(tmp_path, "train", bos_id=0, vocab_size=60000, shard_tokens=1024)
    w.add(list(range(1, n)))
    w.close()
    return TokenStream(tmp_path, "train")


def test_loader_targets_are_inputs_shifted_by_one(tmp_path):
    loader = DataLoader(_stream(tmp_path), batch_size=4, seq_len=16, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, 0], x[:, 0] + 1)


def test_loader_resumes_exactly_and_crosses_epochs(tmp_path):
    stream = _stream(tmp_path, n=600)
    a = DataLoader(stream, batch_size=4, seq_len=16, seed=3)
    batches = [a.next_batch()[0] for _ in range(30)]  # ~37 windows per epoch: several epochs
    assert a.epoch >= 2
    b = DataLoader(stream, batch_size=4, seq_len=16, seed=3)
    for _ in range(11):
        b.next_batch()
    c = DataLoader(stream, batch_size=4, seq_len=16, seed=3)
    c.load_state_dict(b.state_dict())
    for i in range(11, 30):
        assert torch.equal(c.next_batch()[0], batches[i])


def test_ranks_split_the_global_batch_of_one_process(tmp_path):
    stream = _stream(tmp_path)
    whole = DataLoader(stream, batch_size=6, seq_len=8, seed=5)
    ranks = [DataLoader(stream, batch_size=3, seq_len=8, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, _ = whole.next_batch()
        assert torch.equal(x, torch.cat([r.next_batch()[0] for r in ranks]))


def test_loader_refuses_other_batch_on_resume(tmp_path):
    stream = _stream(tmp_path)
    state = DataLoader(stream, batch_size=4, seq_len=8, seed=0).state_dict()
    with pytest.raises(LmforgeError, match="same --batch-size"):
        DataLoader(stream, batch_size=2, seq_len=8, seed=0).load_state_dict(state)


def test_prepared_data_accounts_for_every_byte(small_data, small_corpus):
    meta = read_meta(small_data)
    splits = meta["splits"]
    total = sum(len(p.read_bytes()) for p in small_corpus.iterdir())
    assert splits["train"]["num_bytes"] + splits["val"]["num_bytes"] == total
    assert splits["val"]["num_bytes"] == len((small_data / "val.txt").read_bytes())
    assert splits["val"]["num_documents"] >= 1
    val = TokenStream(small_data, "val").all()
    lengths = np.array(meta["token_bytes"])
    assert lengths[val].sum() == splits["val"]["num_bytes"]  # bos stands for 0 bytes
