"""The whole data pipeline: every document accounted for, planted duplicates and PII handled, the same
output for any number of tasks and workers, and shards that training reads."""

import gzip
import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.data import TokenStream, read_meta
from lmforge.dataprep.pipeline import PrepareConfig, ngram_hashes, prepare
from lmforge.dataprep.synthetic import make_web_corpus, prose_paragraphs, score_prepared

SMALL_CRAWL = dict(num_originals=60, exact_dups=10, near_dup_edits=(1, 2, 3, 5), near_dups_per_level=10,
                   spam_pages=8, pii_pages=20)


def reconciles(manifest) -> bool:
    counts = manifest["counts"]
    return counts["documents_in"] == counts["kept"] + sum(counts["dropped"].values())


@pytest.fixture(scope="module")
def crawl_runs(tmp_path_factory):
    """The synthetic crawl prepared twice: 1 task in 1 process, and 3 tasks on 2 workers."""
    root = tmp_path_factory.mktemp("pipeline")
    truth = make_web_corpus(root / "crawl", seed=3, **SMALL_CRAWL)
    runs = {tasks: prepare(PrepareConfig(inputs=[str(root / "crawl")], out=str(root / f"out{tasks}"), tasks=tasks,
                                         workers=workers, vocab_size=512, keep_work=True), progress=False)
            for tasks, workers in ((1, 1), (3, 2))}
    return root, truth, runs


def test_crawl_counts_reconcile_and_duplicates_and_pii_are_handled(crawl_runs):
    root, truth, runs = crawl_runs
    manifest = runs[1]
    assert reconciles(manifest)
    counts = manifest["counts"]
    assert counts["documents_in"] == len(truth["pages"]) + 1  # every page, and truth.json itself
    assert counts["skipped"] == {}  # the synthetic WARC holds responses only
    score = score_prepared(truth, root / "out1" / "work")
    assert score["copies_found"] >= 0.95 * score["copies"], score
    assert score["false_merges"] == 0, score
    assert score["pii_planted_in_kept"] > 0 and score["pii_left"] == 0, score
    assert score["look_alikes_in_kept"] > 0 and score["look_alikes_redacted"] == 0, score
    spam = [p["id"] for p in truth["pages"] if p["kind"] == "spam"]
    kept = {json.loads(line)["id"] for p in (root / "out1" / "work" / "kept").glob("*.jsonl") for line in p.open()}
    assert not kept & set(spam)  # junk pages go, by quality rule or as duplicates of each other
    # the funnel the card draws chains: each step's out is the next step's in, the last is what was kept
    stages = manifest["stages"]
    for a, b in zip(stages, stages[1:]):
        assert a["documents_in"] - sum(a["dropped"].values()) == b["documents_in"]
    assert stages[-1]["documents_in"] - sum(stages[-1]["dropped"].values()) == counts["kept"]
    card = (root / "out1" / "data_card.md").read_text()
    assert f"{counts['documents_in']:,} = {counts['kept']:,} + {sum(counts['dropped'].values()):,}" in card


def test_output_does_not_depend_on_tasks_or_workers(crawl_runs):
    root, _, runs = crawl_runs
    one, three = runs[1], runs[3]
    assert one["counts"] == three["counts"] and one["splits"] == three["splits"]
    assert one["files"] == three["files"]  # shards, tokenizer and val.txt byte for byte


def test_the_ray_executor_gives_the_same_output(crawl_runs):
    """The cluster path, on a Ray started on this machine: datatrove's RayPipelineExecutor runs the same
    stages as tasks (a real cluster needs `out` on a shared filesystem and RAY_ADDRESS set)."""
    ray = pytest.importorskip("ray")
    root, _, runs = crawl_runs
    try:
        manifest = prepare(PrepareConfig(inputs=[str(root / "crawl")], out=str(root / "out_ray"), executor="ray",
                                         tasks=3, workers=2, vocab_size=512), progress=False)
    finally:
        ray.shutdown()
    assert manifest["counts"] == runs[1]["counts"] and manifest["files"] == runs[1]["files"]


def test_shards_are_what_training_reads(crawl_runs):
    root, _, runs = crawl_runs
    out = root / "out1"
    meta = read_meta(out)
    assert meta["splits"] == runs[1]["splits"]
    for split in ("train", "val"):
        stream = TokenStream(out, split)
        tokens = np.concatenate([np.load(p) for p in sorted(out.glob(f"{split}_*.npy"))])
        assert len(stream) == len(tokens) == meta["splits"][split]["num_tokens"]
        assert (tokens == meta["bos_id"]).sum() == meta["splits"][split]["num_documents"]  # one <|bos|> per doc
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(out / "tokenizer.json")
    val = np.concatenate([np.load(p) for p in sorted(out.glob("val_*.npy"))])
    docs = [tokenizer.decode(d) for d in np.split(val, np.flatnonzero(val == meta["bos_id"]))[1:]]
    assert "".join(d.removeprefix("<|bos|>") for d in docs) == (out / "val.txt").read_text()


def test_every_input_format_and_every_drop_is_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = __import__("random").Random(0)
    inputs = tmp_path / "in"
    (inputs / "notes").mkdir(parents=True)
    prose = ["\n\n".join(prose_paragraphs(rng, 4)) for _ in range(40)]
    for i, text in enumerate(prose[:10]):
        (inputs / "notes" / f"n{i}.txt").write_text(text)
    (inputs / "notes" / "blank.txt").write_text("  \n")
    (inputs / "notes" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with gzip.open(inputs / "docs.jsonl.gz", "wt") as f:
        for i, text in enumerate(prose[10:25]):
            f.write(json.dumps({"text": text, "id": f"j{i}"}) + "\n")
        f.write("{not json\n" + json.dumps({"body": "no text field"}) + "\n" + json.dumps({"text": prose[10]}) + "\n")
    pq.write_table(pa.table({"text": prose[25:] + [""], "id": [f"p{i}" for i in range(16)]}), inputs / "t.parquet")
    manifest = prepare(PrepareConfig(inputs=[str(inputs)], out=str(tmp_path / "out"), workers=1, vocab_size=400,
                                     heldout_fraction=0.2), progress=False)
    counts = manifest["counts"]
    assert reconciles(manifest)
    assert counts["documents_in"] == 10 + 2 + 15 + 3 + 16
    dropped = counts["dropped"]
    assert dropped["binary"] == 1 and dropped["bad_json"] == 1 and dropped["no_text_field"] == 1
    assert dropped["empty"] == 2  # the blank file and the empty Parquet row
    assert dropped["exact_duplicate"] == 1  # the JSONL line repeating j0's text
    assert counts["kept"] == 40 and counts["kept_by_split"]["val"] > 0
    assert not (tmp_path / "out" / "work").exists()  # working files removed without keep_work


def test_bad_input_is_dropped_counted_and_named_and_the_rest_is_intact(tmp_path, capsys):
    """Binary, invalid UTF-8, empty, a 100 MB single line, malformed JSONL lines, a gzip cut short, a WARC
    cut short and one with garbage between records: each dropped with a reason and its file and position
    reported; the run goes on, and every good document around them is kept whole."""
    from lmforge.dataprep.synthetic import html_page, warc_record

    rng = __import__("random").Random(3)
    good = ["\n\n".join(prose_paragraphs(rng, 4)) for _ in range(12)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "ok.txt").write_text(good[0])
    (inputs / "image.txt").write_bytes(b"GIF89a\x00\x01\x02")
    (inputs / "latin1.txt").write_bytes("na\xefve caf\xe9".encode("latin-1"))
    (inputs / "empty.md").write_text("\n \n")
    with open(inputs / "huge.txt", "wb") as f:  # 100 MB, one line: never even read
        f.write(b"x" * (100 << 20))
    lines = [json.dumps({"text": good[1]}), "{not json", json.dumps([1, 2]), json.dumps({"body": "x"}),
             json.dumps({"text": good[2]})]
    (inputs / "docs.jsonl").write_text("\n".join(lines) + "\n")
    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in good[3:6]).encode())
    (inputs / "cut.jsonl.gz").write_bytes(whole[:-30])  # the last line's end and the gzip trailer are gone
    records = [warc_record(f"https://ok.example/{i}", html_page(f"Page {i}", good[6 + i]), f"0000-{i}")
               for i in range(4)]
    (inputs / "garbled.warc.gz").write_bytes(records[0] + gzip.compress(b"this is no WARC header\r\n\r\n")
                                             + records[1])
    (inputs / "cut.warc.gz").write_bytes(records[2] + records[3][:len(records[3]) // 2])
    manifest = prepare(PrepareConfig(inputs=[str(inputs)], out=str(tmp_path / "out"), workers=1, vocab_size=400,
                                     heldout_fraction=0.3, prose_filters=[], keep_work=True), progress=False)
    assert reconciles(manifest)
    dropped = manifest["counts"]["dropped"]
    assert dropped == {"binary": 1, "invalid_utf8": 1, "empty": 1, "too_large": 1, "bad_json": 2,
                       "no_text_field": 1, "truncated": 2, "malformed_warc": 1}
    where = sorted((p["file"].rsplit("/", 1)[-1], p["reason"], p["position"]) for p in manifest["problems"])
    garbled, cut_warc = (next(w for f, r, w in where if f == name) for name in ("garbled.warc.gz", "cut.warc.gz"))
    assert where == sorted([("image.txt", "binary", "byte 6"), ("latin1.txt", "invalid_utf8", "byte 2"),
                            ("empty.md", "empty", "whole file"), ("huge.txt", "too_large", "whole file"),
                            ("docs.jsonl", "bad_json", "line 2"), ("docs.jsonl", "bad_json", "line 3"),
                            ("docs.jsonl", "no_text_field", "line 4"), ("cut.jsonl.gz", "truncated", "line 3"),
                            ("garbled.warc.gz", "malformed_warc", garbled), ("cut.warc.gz", "truncated", cut_warc)])
    assert garbled.startswith("record 1 ") and cut_warc.startswith("record 1 ")
    assert "warning: " in capsys.readouterr().err  # said, not only counted
    card = (tmp_path / "out" / "data_card.md").read_text()
    assert "### Bad input (10, each dropped above)" in card and "cut.jsonl.gz" in card
    kept = [json.loads(line)["text"] for p in (tmp_path / "out" / "work" / "kept").glob("*.jsonl") for line in p.open()]
    assert len(kept) == 8  # ok.txt, 2 JSONL lines, the cut gzip's 2 whole lines, 2 + 1 WARC pages
    for text in good[:5] + good[6:9]:  # every good document around the bad ones, whole
        assert any(" ".join(text.split()[:30]) in " ".join(k.split()) for k in kept), text[:60]


def test_decontamination_drops_training_documents_sharing_a_13_gram(tmp_path):
    rng = __import__("random").Random(1)
    docs = ["\n\n".join(prose_paragraphs(rng, 4)) for _ in range(30)]
    (tmp_path / "in").mkdir()
    for i, text in enumerate(docs):
        (tmp_path / "in" / f"d{i:02d}.txt").write_text(text)
    leaked = " ".join(docs[4].split()[20:33])  # 13 words of a training document, inside an eval question
    with open(tmp_path / "eval.jsonl", "w") as f:
        f.write(json.dumps({"question": f"What follows? {leaked}", "answer": "nothing"}) + "\n")
        f.write(json.dumps({"question": " ".join(docs[8].split()[:12]), "answer": "x"}) + "\n")  # 12 words: kept
        f.write(json.dumps({"question": " ".join(docs[11].split()[:20])}) + "\n")  # d11 is held out: never dropped
    config = PrepareConfig(inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), workers=1, vocab_size=400,
                           heldout_fraction=0.2, decontaminate=[str(tmp_path / "eval.jsonl")], keep_work=True)
    manifest = prepare(config, progress=False)
    assert manifest["counts"]["dropped"] == {"decontaminated": 1}
    kept = {json.loads(line)["id"]: json.loads(line)["metadata"]["split"]
            for p in (tmp_path / "out" / "work" / "kept").glob("*.jsonl") for line in p.open()}
    assert "d04.txt" not in kept and kept["d08.txt"] == "train" and kept["d11.txt"] == "val" and len(kept) == 29
    assert ngram_hashes(leaked, 13) <= ngram_hashes(docs[4].upper().replace(".", " ."), 13)  # case, punctuation


def test_config_file_and_cli(tmp_path, capsys):
    rng = __import__("random").Random(2)
    (tmp_path / "corpus").mkdir()
    for i in range(20):
        (tmp_path / "corpus" / f"{i}.md").write_text("\n\n".join(prose_paragraphs(rng, 3)))
    (tmp_path / "data.toml").write_text('inputs = ["corpus"]\nout = "prepared"\nvocab_size = 300\nworkers = 1\n'
                                        "heldout_fraction = 0.25\n")
    assert main(["data", "prepare", "--config", str(tmp_path / "data.toml"), "--quiet"]) == 0
    assert "20 documents in, 20 kept" in capsys.readouterr().out
    out = tmp_path / "prepared"  # relative to the config file
    assert json.loads((out / "manifest.json").read_text())["config"]["vocab_size"] == 300
    assert (out / "data_card.md").exists() and (out / "lengths.png").exists()

    (tmp_path / "bad.toml").write_text('inputs = ["corpus"]\nvocab = 300\n')
    assert main(["data", "prepare", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown setting(s) ['vocab']" in capsys.readouterr().err
    assert main(["data", "prepare", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
    (tmp_path / "corpus" / "cut.warc.gz").write_bytes(gzip.compress(b"WARC/1.1\r\nContent-Length: 50\r\n\r\nab")[:-9])
    assert main(["data", "prepare", "--config", str(tmp_path / "data.toml"), "--quiet"]) == 0  # bad input: said
    out, err = capsys.readouterr()
    assert "21 documents in, 20 kept" in out
    assert err.startswith(f"warning: {tmp_path / 'corpus' / 'cut.warc.gz'}: record 0 (byte ")
    assert err.strip().endswith("uncompressed): truncated") and len(err.strip().splitlines()) == 1

    (tmp_path / "urls.txt").write_text("# seeds\nhttps://example.org/\nexample.org/page\n")
    assert main(["data", "crawl", str(tmp_path / "urls.txt"), "--out", str(tmp_path / "c.warc.gz")]) == 2
    err = capsys.readouterr().err
    assert "urls.txt:3" in err and "not an http(s) URL" in err and not (tmp_path / "c.warc.gz").exists()
    (tmp_path / "typo.toml").write_text('inputs = ["corpus"]\nworkers = "two"\n')
    with pytest.raises(LmforgeError, match="workers = 'two' should be of type int"):
        PrepareConfig.from_toml(tmp_path / "typo.toml")
    (tmp_path / "eval.jsonl").write_text('{"q": "fine"}\n{broken\n')
    with pytest.raises(LmforgeError, match="eval.jsonl: unreadable"):
        PrepareConfig(inputs=[str(tmp_path / "corpus")], decontaminate=[str(tmp_path / "eval.jsonl")]).check()
    with pytest.raises(LmforgeError, match="not valid TOML"):
        (tmp_path / "broken.toml").write_text("inputs = [")
        PrepareConfig.from_toml(tmp_path / "broken.toml")
