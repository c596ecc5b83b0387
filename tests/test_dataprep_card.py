"""The data card: its pictures are real PNGs, its tables carry every count, the funnel chains, and a
manifest whose numbers do not add up is shouted about rather than drawn tidily."""

import copy
import re
import struct
import sys

import numpy as np
import pytest

from lmforge.dataprep.card import (
    MAX_REASON_BARS,
    accounting_problems,
    describe_reason,
    plot_drop_reasons,
    toml_text,
    write_data_card,
)

DROPPED = {"near_duplicate": 100, "exact_duplicate": 40, "gopher_short_doc": 30, "code_long_line": 5,
           "html_no_text": 3, "decontaminated": 2, "mystery_reason": 1}


def make_manifest() -> dict:
    stages = [
        {"name": "read", "documents_in": 1000, "dropped": {"html_no_text": 3, "mystery_reason": 1}, "seconds": 1.2},
        {"name": "filter", "documents_in": 996, "dropped": {"gopher_short_doc": 30, "code_long_line": 5},
         "seconds": 2.0},
        {"name": "exact dedup", "documents_in": 961, "dropped": {"exact_duplicate": 40}, "seconds": 0.4},
        {"name": "near dedup", "documents_in": 921, "dropped": {"near_duplicate": 100}, "seconds": 3.1},
        {"name": "decontaminate", "documents_in": 821, "dropped": {"decontaminated": 2}, "seconds": 0.2},
        {"name": "split", "documents_in": 819, "dropped": {}, "seconds": 0.1},
    ]
    return {
        "created": "2026-11-23T10:00:00", "lmforge_version": "0.1.0",
        "inputs": [{"path": "/data/web", "kind": "warc", "num_files": 3, "num_bytes": 123456},
                   {"path": "/data/code", "kind": "folder", "num_files": 40, "num_bytes": 98765}],
        "config": {"min_words": 50, "near_dedup": True, "threshold": 0.8, "val_fraction": 0.02, "lr": 1e-05,
                   "languages": ["en", "de"], "name": 'web "mix"', "cap": None, "minhash": {"n_grams": 5}},
        "tokenizer": {"file": "tokenizer.json", "vocab_size": 8192, "trained": True, "sha256": "ab" * 32},
        "counts": {
            "documents_in": 1000, "kept": 819, "kept_by_split": {"train": 803, "val": 16},
            "dropped": dict(DROPPED),
            "skipped": {"request": 50, "warcinfo": 3},
            "modified": {"repaired_unicode": 12, "whitespace_normalised": 400, "redacted_email": 20},
        },
        "stages": stages,
        "splits": {"train": {"num_documents": 803, "num_tokens": 500000, "num_bytes": 2000000, "num_shards": 1},
                   "val": {"num_documents": 16, "num_tokens": 10000, "num_bytes": 40000, "num_shards": 1}},
        "files": {"train_0000.npy": "cd" * 32, "val_0000.npy": "ef" * 32, "tokenizer.json": "ab" * 32},
        "seconds": 12.5, "tasks": 4, "workers": 2,
    }


def make_lengths(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"train": rng.lognormal(6, 1, 803).astype(np.int64) + 1, "val": rng.lognormal(6, 1, 16).astype(np.int64) + 1}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def section(card: str, title: str) -> str:
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row] for row in rows[2:]]  # past the header and its rule


def number(cell: str) -> int:
    return int(cell.strip("*").replace(",", ""))


@pytest.fixture
def card(tmp_path):
    path = write_data_card(tmp_path, make_manifest(), make_lengths())
    return path, path.read_text()


def test_files_written_and_pictures_are_real(card, tmp_path):
    path, _ = card
    assert path == tmp_path / "data_card.md"
    for name in ("lengths.png", "drop_reasons.png"):
        width, height = png_size(tmp_path / name)
        assert width >= 500 and height >= 250
        assert (tmp_path / name).stat().st_size > 10_000  # drawn, not blank
    # the lengths picture has both splits' colours in it (tab:blue train, tab:orange val)
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "lengths.png")[..., :3]
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(pixels - np.array(rgb) / 255).max(axis=-1) < 0.05).any()


def test_every_reason_and_count_is_in_the_card(card):
    _, text = card
    rows = {r[0].strip("`"): r for r in table_rows(section(text, "Dropped, by reason"))}
    for reason, n in DROPPED.items():
        assert number(rows[reason][1]) == n
        assert rows[reason][2] == f"{n / 1000:.1%}"
    assert rows["near_duplicate"][3] == describe_reason("near_duplicate") != ""
    assert rows["mystery_reason"][3] == ""  # unknown: shown without a meaning, not an error
    assert number(rows["**all**"][1]) == sum(DROPPED.values())
    assert "![where the documents went](drop_reasons.png)" in text
    assert "![document lengths](lengths.png)" in text


def test_funnel_chains_and_reconciles(card):
    _, text = card
    rows = table_rows(section(text, "Where the documents went"))
    assert [r[0] for r in rows] == [s["name"] for s in make_manifest()["stages"]]
    ins, outs = [number(r[1]) for r in rows], [number(r[3]) for r in rows]
    assert ins[0] == 1000 and outs[-1] == 819
    assert outs[:-1] == ins[1:]
    assert "`near_duplicate` 100" in rows[3][2]
    assert "Accounting: documents in = kept + dropped: 1,000 = 819 + 181." in text
    assert "WARNING" not in text and "DOES NOT HOLD" not in text


def test_lengths_percentiles(card):
    _, text = card
    lengths = make_lengths()
    rows = {r[0]: r for r in table_rows(section(text, "Lengths"))}
    for split, x in lengths.items():
        p5, p50, p95 = np.percentile(x, [5, 50, 95])
        assert [number(c) for c in rows[split][1:6]] == [len(x), round(p5), round(p50), round(p95), x.max()]


def test_nothing_dropped(tmp_path):
    manifest = make_manifest()
    manifest["counts"].update(dropped={}, kept=1000, kept_by_split={"train": 980, "val": 20})
    manifest["stages"] = [{"name": "read", "documents_in": 1000, "dropped": {}, "seconds": 1.0}]
    text = write_data_card(tmp_path, manifest, {"train": np.full(980, 300), "val": np.array([], dtype=np.int64)}
                           ).read_text()
    assert "Nothing dropped" in text and "1,000 = 1,000 + 0." in text and "WARNING" not in text
    assert png_size(tmp_path / "drop_reasons.png")[0] >= 500
    assert plot_drop_reasons(manifest["counts"], tmp_path / "again.png") == [("kept", 1000)]
    assert "| val | 0 | - |" in text  # an empty split is a row, not a crash


def test_many_reasons_share_an_other_bar(tmp_path):
    dropped = {f"reason_{i:02d}": 100 - i for i in range(40)}
    counts = {"documents_in": 5000, "kept": 5000 - sum(dropped.values()), "dropped": dropped}
    bars = plot_drop_reasons(counts, tmp_path / "drops.png")
    assert bars[0] == ("kept", counts["kept"])
    assert len(bars) == 1 + MAX_REASON_BARS
    assert bars[1] == ("reason_00", 100)  # largest first
    kept_reasons = MAX_REASON_BARS - 1
    assert bars[-1] == (f"other ({40 - kept_reasons} reasons)", sum(100 - i for i in range(kept_reasons, 40)))
    assert sum(n for _, n in bars) == counts["documents_in"]  # no document lost to the cap


def test_mismatched_manifest_is_shouted(tmp_path):
    manifest = make_manifest()
    manifest["counts"]["dropped"]["near_duplicate"] = 90  # 10 documents vanish
    text = write_data_card(tmp_path, manifest, make_lengths()).read_text()
    head = text.split("## Inputs", 1)[0]
    assert "WARNING: THE ACCOUNTING DOES NOT ADD UP" in head
    assert "documents in (1,000) != kept (819) + dropped (171) = 990: +10 documents unaccounted for" in head
    assert "DOES NOT HOLD: 1,000 != 819 + 171 = 990" in head


def test_broken_funnel_is_found():
    manifest = make_manifest()
    assert accounting_problems(manifest) == []
    broken = copy.deepcopy(manifest)
    broken["stages"][3]["documents_in"] = 930
    problems = accounting_problems(broken)
    assert problems == ["stage exact dedup passes on 921 documents but stage near dedup receives 930",
                        "stage near dedup passes on 830 documents but stage decontaminate receives 821"]
    broken = copy.deepcopy(manifest)
    broken["stages"][-1]["dropped"] = {"mystery_reason": 1}
    assert accounting_problems(broken) == ["the last stage (split) passes on 818 documents, not the 819 kept"]


def test_reason_descriptions_by_family():
    assert describe_reason("gopher_short_doc").startswith("Gopher")
    assert describe_reason("fineweb_line_punct_ratio") == describe_reason("line_punct_ratio") != ""
    assert describe_reason("gopher_something_new") == "Gopher quality or repetition filter"
    assert describe_reason("code_new_rule") == "code filter"
    assert describe_reason("< 3 paragraphs") == ""


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is 3.11+")
def test_config_toml_reads_back(card):
    import tomllib

    _, text = card
    block = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    config = make_manifest()["config"]
    assert "# cap = (unset)" in block
    assert tomllib.loads(block) == {k: v for k, v in config.items() if v is not None}
    assert tomllib.loads(toml_text({"a b": [1, 2.5, "x"], "t": {"u": {"v": False}}})) == {
        "a b": [1, 2.5, "x"], "t": {"u": {"v": False}}}
