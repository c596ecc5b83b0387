"""Near-duplicates on the synthetic crawl: planted copies found, distinct pages never merged, the same
survivors whatever the number of tasks."""

import gzip
import json

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.writers import JsonlWriter

from lmforge.dataprep.dedup import near_duplicates
from lmforge.dataprep.readers import HtmlExtractor, TextFileReader, WarcReader
from lmforge.dataprep.synthetic import make_web_corpus


def test_planted_near_duplicates_are_found_without_false_merges(tmp_path):
    truth = make_web_corpus(tmp_path / "crawl", seed=11, num_originals=60, exact_dups=10,
                            near_dup_edits=(1, 2, 3, 5), near_dups_per_level=10, spam_pages=6, pii_pages=6)
    crawl = str(tmp_path / "crawl")
    results = {}
    for tasks in (1, 3):
        docs = tmp_path / f"docs{tasks}"
        LocalPipelineExecutor([WarcReader(crawl), TextFileReader(f"{crawl}/html"), HtmlExtractor(),
                               JsonlWriter(str(docs))], tasks=tasks, workers=1, logging_dir=str(tmp_path / f"l{tasks}"),
                              skip_completed=False).run()
        results[tasks] = near_duplicates(docs, tmp_path / f"work{tasks}", tmp_path / f"out{tasks}", tasks=tasks,
                                         workers=2)
    one, three = results[1], results[3]
    assert one["survivor_of"] == three["survivor_of"] and one["counts"] == three["counts"]

    def page_id(doc_id):  # ids as the readers give them: URLs, or paths relative to html/
        return doc_id if doc_id.startswith("http") else f"html/{doc_id}"
    survivor = {page_id(k): page_id(v) for k, v in one["survivor_of"].items()}
    pages = {p["id"]: p for p in truth["pages"]}
    group = {i: p.get("of", i) for i, p in pages.items()}  # every page -> the original it copies
    copies = [i for i, p in pages.items() if p["kind"] in ("exact_dup", "near_dup")]
    found = [i for i in copies if i in survivor and survivor[i] == survivor.get(group[i])]
    assert len(found) >= 0.95 * len(copies), (len(found), len(copies))
    clusters = {}
    for i, s in survivor.items():
        clusters.setdefault(s, set()).add(group[i])
    assert all(len(originals) == 1 for originals in clusters.values())  # never two different pages merged
    kept = [json.loads(line) for f in (tmp_path / "out1").glob("*") for line in gzip.open(f)]
    assert len(kept) == one["counts"]["kept"] == len(pages) - one["counts"]["dropped_near_duplicate"]
    assert len({group[page_id(d["id"])] for d in kept}) == len({group[i] for i in pages})  # one of each remains
