"""Data pipeline throughput and quality: `prepare` on the stdlib corpus and on a synthetic web crawl,
with one worker and with every core.

    python bench/data_pipeline.py                      # stdlib + a ~4,000-page crawl, 1 and all workers
    python bench/data_pipeline.py --web-originals 500  # a smaller crawl

Throughput is input bytes (files as read: the stdlib's .py files and pydoc topics; the crawl's HTML
files and 8 gzipped WARC files) and documents in, per wall-clock second of the whole pipeline: reading,
HTML extraction, cleaning, every filter, PII redaction, exact and near dedup, the split and the
encoding into shards. The tokenizer is trained once beforehand and given to every run, so the
figures do not include BPE training (single-process, and a function of the vocabulary, not of the
pipeline). Each configuration runs once after an untimed warm-up of the same size on one worker;
MB = 10^6 bytes.

On the crawl, the planted answers are scored (synthetic.score_prepared): planted exact and near
copies found as duplicates of their own original, documents merged with a different page (false
positives), planted PII left in kept documents, and look-alikes (version numbers, invalid card
numbers, dates, ...) wrongly redacted. The outputs of 1 and N workers are compared file by file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from lmforge.dataprep.pipeline import PrepareConfig, prepare
from lmforge.dataprep.synthetic import make_web_corpus, score_prepared


def run(inputs: list[str], out: Path, workers: int, tokenizer: str, **settings) -> tuple[dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = prepare(PrepareConfig(inputs=inputs, out=str(out), workers=workers, tasks=workers,
                                     tokenizer=tokenizer, keep_work=True, **settings), progress=False)
    return manifest, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--web-originals", type=int, default=2000, help="original pages in the crawl (default 2000)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="the 'all workers' count")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-data-"))
    n = args.web_originals
    truth = make_web_corpus(root / "crawl", seed=args.seed, num_originals=n, exact_dups=n // 5,
                            near_dup_edits=(1, 2, 3, 5, 8), near_dups_per_level=n // 12, spam_pages=n // 7,
                            pii_pages=n * 3 // 10, warc_files=8)
    (root / "crawl" / "truth.json").rename(root / "truth.json")  # the answers are not an input
    print(f"crawl: {len(truth['pages']):,} pages in {root / 'crawl'}")
    # one tokenizer for every run (trained untimed on the stdlib, the same for both corpora)
    run(["stdlib"], root / "tok", args.workers, "", vocab_size=8192, tokenizer_max_bytes=10_000_000)
    tokenizer = str(root / "tok" / "tokenizer.json")
    corpora = {"stdlib": (["stdlib"], {"prose_filters": []}),  # as `lmforge run` prepares it
               "web crawl": ([str(root / "crawl")], {})}
    results = []
    for name, (inputs, settings) in corpora.items():
        run(inputs, root / "warm", 1, tokenizer, **settings)
        outputs = {}
        for workers in sorted({1, args.workers}):
            manifest, seconds = run(inputs, root / f"{name}-{workers}", workers, tokenizer, **settings)
            num_bytes = sum(i["num_bytes"] for i in manifest["inputs"])
            counts = manifest["counts"]
            row = {"corpus": name, "workers": workers, "seconds": seconds, "mb": num_bytes / 1e6,
                   "mb_per_s": num_bytes / 1e6 / seconds, "docs_in": counts["documents_in"],
                   "docs_per_s": counts["documents_in"] / seconds, "kept": counts["kept"],
                   "dropped": counts["dropped"], "stage_seconds": manifest["stage_seconds"],
                   "reconciles": counts["documents_in"] == counts["kept"] + sum(counts["dropped"].values())}
            if name == "web crawl":
                row["score"] = score_prepared(truth, root / f"{name}-{workers}" / "work")
            outputs[workers] = manifest["files"]
            results.append(row)
            print(f"{name:10s} {workers} worker(s): {seconds:6.1f} s  {row['mb_per_s']:6.2f} MB/s  "
                  f"{row['docs_per_s']:7.1f} docs/s  ({row['mb']:.1f} MB, {row['docs_in']:,} docs in, "
                  f"{row['kept']:,} kept; in == kept + dropped: {row['reconciles']})")
            print("           stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in row["stage_seconds"].items()))
        same = len({json.dumps(files, sort_keys=True) for files in outputs.values()}) == 1
        print(f"{name:10s} output of 1 worker == {args.workers} workers (every file's sha256): {same}")
        results[-1]["same_output_as_1_worker"] = same

    score = results[-1]["score"]
    print(f"\nweb crawl, planted answers ({len(truth['pages']):,} pages, seed {args.seed}):")
    print(f"  near/exact copies found  {score['copies_found']:,}/{score['copies']:,} = "
          f"{score['copies_found'] / score['copies']:.1%}")
    print(f"  false merges             {score['false_merges']}/{score['documents']:,} documents = "
          f"{score['false_merges'] / score['documents']:.2%}")
    print(f"  PII redacted             {score['pii_planted_in_kept'] - score['pii_left']:,}/"
          f"{score['pii_planted_in_kept']:,} planted values in kept documents = "
          f"{1 - score['pii_left'] / max(1, score['pii_planted_in_kept']):.2%}")
    print(f"  look-alikes redacted     {score['look_alikes_redacted']}/{score['look_alikes_in_kept']:,}")
    print(f"  dropped by reason        {results[-1]['dropped']}")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; work files in {root}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":  # datatrove's worker processes re-import this file
    main()
