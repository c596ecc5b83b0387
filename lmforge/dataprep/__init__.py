"""The data pipeline: raw scraped text to clean, deduplicated, private token shards (`lmforge data`).

pipeline.py strings the stages together (prepare, PrepareConfig); readers.py (inputs, HTML
extraction), clean.py, filters.py (prose, code, URL, word list, language), dedup.py (exact and
near), pii.py (redaction), card.py (data_card.md), crawl.py (`lmforge data crawl`) and synthetic.py
(a crawl with planted answers, for tests and bench/data_pipeline.py). What follows records what was
measured of datatrove 0.10.1 offline (2026-11-23, on tiny inputs) and so why each piece is
datatrove's or ours.

Clusters: `executor = "ray"` runs every stage with datatrove's RayPipelineExecutor on the Ray
cluster at RAY_ADDRESS (tested on a Ray started locally: the same output, byte for byte); `out`
must then be on a filesystem every node sees, since stages hand each other files in out/work. The
steps between stages (find_duplicates, tokenizer training, write_shards) run in the driver.
datatrove's SlurmPipelineExecutor takes the same step lists (not wired up: no Slurm here to test).

Use from datatrove as it is
  LocalPipelineExecutor (Slurm/RayPipelineExecutor: the same pipeline, documented for clusters);
  JsonlReader / ParquetReader with an adapter that counts every raw record (the readers skip an
  empty text with a warning and no statistic); FTFYFormatter; GopherQualityFilter,
  GopherRepetitionFilter, FineWebQualityFilter and C4QualityFilter(filter_no_terminal_punct=False,
  as FineWeb ran it; it rewrites the text, and drops any document with "{", so never on code), all
  with their published thresholds as defaults; MinhashDedupSignature + MinhashDedupBuckets +
  MinhashDedupFilter with MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8);
  URLFilter subclassed to pass documents without a URL (it asserts one) and to never fetch the
  public-suffix list (TLDExtract(suffix_list_urls=())); its built-in blocklist costs ~740 MB and
  2 s per worker (use_integrated_lists=False for the small default list).

Write ourselves, and why
  - readers for folders of text/code files and HTML files (none exists), and for WARC/WET with
    every skipped record counted by reason (datatrove's WarcReader skips silently and needs
    faust-cchardet + python-magic/libmagic);
  - HTML extraction calling trafilatura.extract in-process with deduplicate=False: datatrove's
    extractor runs it in a child with a 1 s timeout, counts crashes as "timeout" (not dropped),
    and its per-process dedup cache makes the output depend on what a worker saw before;
  - the code filters (line lengths, alphanumeric fraction, auto-generated / data-like files);
  - PII (pii.py): datatrove's PIIFormatter covers emails and public IPv4 only, and rotates
    replacement strings per worker;
  - exact dedup and the MinHash *cluster* step: datatrove's keep a different copy of a duplicate
    set depending on the number of tasks (documents are named by (rank, index)); keying each
    document by a stable id and keeping the smallest key makes 1 worker == N workers (tested);
  - held-out split by document hash, 13-gram decontamination (datatrove's needs lighteval), token
    shards in data.py's format, manifest and data card.

Word tokenizer: the filters and MinHash take `language=` through load_word_tokenizer, which for
English means spaCy's blank model (offline once spacy is installed, ~2 s per worker) and fails
without it; a small regex WordTokenizer subclass (importable, so it pickles to workers) works too.
Every dropping step goes through BaseFilter with a reason, so stats carry dropped_<reason>; the
run sums logging_dir/stats/*.json by step position (fresh logging_dir per run: skip_completed is
on by default) and checks documents in == kept + dropped by reason. Scripts that start workers
need an `if __name__ == "__main__":` guard (forkserver re-imports __main__).
"""
