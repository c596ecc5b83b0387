"""Duplicate clusters: the smallest id survives whatever order or task the copies came in, exact and
near copies are told apart, and DropDuplicates drops exactly the listed positions. (The planted-copy
recall on the synthetic crawl is measured through the whole pipeline: test_dataprep_pipeline.py.)"""

import json
import struct

from datatrove.data import Document

from lmforge.dataprep.dedup import DropDuplicates, find_duplicates, text_hash


def write_keys(folder, tasks):
    folder.mkdir(parents=True, exist_ok=True)
    for rank, docs in tasks.items():
        (folder / f"{rank:05d}.keys").write_text("".join(json.dumps([i, text_hash(t)]) + "\n" for i, t in docs))


def write_pairs(folder, pairs):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000.dups").write_bytes(b"".join(struct.pack("<4I", *p) for p in pairs))


def test_smallest_id_survives_and_reasons_tell_exact_from_near(tmp_path):
    # task 0: c, a, x; task 1: b, A (a in other case and spacing), y. MinHash paired c~b (near) and c~a.
    write_keys(tmp_path / "keys", {0: [("c", "the cat sat on the mat"), ("a", "The cat  sat on the mat."),
                                       ("x", "unrelated")],
                                   1: [("b", "the cat sat on a mat"), ("a2", "the cat sat on the mat."),
                                       ("y", "also unrelated")]})
    write_pairs(tmp_path / "buckets", [(0, 0, 1, 0), (0, 0, 0, 1)])
    survivor_of = find_duplicates(tmp_path / "keys", tmp_path / "buckets", tmp_path / "remove")
    assert survivor_of == {"a": "a", "a2": "a", "b": "a", "c": "a"}
    assert json.loads((tmp_path / "remove" / "00000.json").read_text()) == {"0": "near_duplicate"}
    assert json.loads((tmp_path / "remove" / "00001.json").read_text()) == {"0": "near_duplicate",
                                                                             "1": "exact_duplicate"}
    # exact only: the MinHash pairs are ignored, a and a2 (same normalised text) still collapse
    exact = find_duplicates(tmp_path / "keys", None, tmp_path / "remove_exact")
    assert exact == {"a": "a", "a2": "a"}
    none = find_duplicates(tmp_path / "keys", None, tmp_path / "remove_none", exact=False)
    assert none == {} and not list((tmp_path / "remove_none").iterdir())


def test_the_survivor_does_not_depend_on_how_documents_were_split_into_tasks(tmp_path):
    docs = [(f"d{i}", f"same words here {i % 3}") for i in range(9)]  # three groups of three exact copies
    write_keys(tmp_path / "k1", {0: docs})
    write_keys(tmp_path / "k3", {0: docs[::3], 1: docs[1::3], 2: docs[2::3]})
    one = find_duplicates(tmp_path / "k1", None, tmp_path / "r1")
    three = find_duplicates(tmp_path / "k3", None, tmp_path / "r3")
    assert one == three and set(one.values()) == {"d0", "d1", "d2"}


def test_drop_duplicates_drops_the_listed_positions_with_their_reasons(tmp_path):
    (tmp_path / "00001.json").write_text(json.dumps({"1": "exact_duplicate", "3": "near_duplicate"}))
    step = DropDuplicates(tmp_path)
    docs = [Document(text=f"t{i}", id=f"d{i}") for i in range(5)]
    kept = [d.id for d in step.run(iter(docs), rank=1)]
    assert kept == ["d0", "d2", "d4"]
    stats = step.stats.stats
    assert stats["dropped_exact_duplicate"].total == 1 and stats["dropped_near_duplicate"].total == 1
    assert [d.id for d in DropDuplicates(tmp_path).run(iter(docs), rank=0)] == [d.id for d in docs]  # no list
