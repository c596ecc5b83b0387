"""The data card: data_card.md beside the token shards, with a picture of where the documents went and
one of their lengths, written from the pipeline's manifest.

    write_data_card(out_dir, manifest, lengths)   -> out_dir / "data_card.md", plus lengths.png and
                                                     drop_reasons.png beside it

`lengths` maps each split ("train", "val") to the token counts of its kept documents. The card shows
the accounting (documents in = kept + dropped) with its three numbers; where they do not add up, or the
stages of the funnel do not chain, it says so at the top in bold rather than drawing a tidy picture of
numbers that are wrong (the pipeline raises too: the card is written to show what went wrong).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lmforge.dataprep.pii import PLACEHOLDERS

MAX_REASON_BARS = 25  # beyond this the bars are unreadable: the smallest reasons share one "other" bar
MAX_PROBLEMS_LISTED = 50  # bad inputs named in the card; manifest.json holds them all

# What each drop reason means. Names are the reasons the steps report (datatrove's `dropped_<reason>`
# stats, without the prefix); an unknown reason is shown without a meaning, never an error.
REASONS = {
    # readers.py
    "empty": "nothing left to read (empty file, record or text after cleaning)",
    "binary": "the file is binary, not text",
    "bad_json": "a JSONL line that is not valid JSON",
    "invalid_utf8": "a file or JSONL line that is not UTF-8",
    "too_large": "over max_document_bytes (default 16 MB): not read",
    "truncated": "the file ends early (a gzip, WARC record or Parquet file cut short); what came before is kept",
    "malformed_warc": "bytes where a WARC record header should be; skipped to the next record",
    "no_text_field": "a record without the text field",
    "http_status_not_200": "a WARC response whose HTTP status is not 200",
    "not_html": "a WARC response that is not HTML",
    "html_extract_error": "the HTML extractor (trafilatura) failed on the page",
    "html_no_text": "the HTML page has no main text once boilerplate is removed",
    # dedup and held-out hygiene
    "exact_duplicate": "the same text as a document kept elsewhere",
    "near_duplicate": "a near copy (MinHash, 5-grams) of a document kept elsewhere",
    "decontaminated": "shares a 13-gram with an evaluation set",
    # datatrove's URL filter
    "domain": "URL blocklist: the domain is listed",
    "subdomain": "URL blocklist: the subdomain is listed",
    "url": "URL blocklist: the URL is listed",
    "hard_blacklisted": "URL blocklist: a banned word in the URL",
    "soft_blacklisted": "URL blocklist: too many suspect words in the URL",
    "blacklisted_subword": "URL blocklist: a banned subword in the URL",
    "harmful_words": "contains words on the harmful-content list",
    # datatrove's Gopher quality filter (Rae et al. 2021, "Scaling Language Models", appendix A)
    "gopher_short_doc": "Gopher: under 50 words",
    "gopher_long_doc": "Gopher: over 100,000 words",
    "gopher_below_avg_threshold": "Gopher: mean word length under 3 characters",
    "gopher_above_avg_threshold": "Gopher: mean word length over 10 characters",
    "gopher_too_many_hashes": "Gopher: too many '#' symbols per word",
    "gopher_too_many_ellipsis": "Gopher: too many ellipses per word",
    "gopher_too_many_bullets": "Gopher: too many lines start with a bullet",
    "gopher_too_many_end_ellipsis": "Gopher: too many lines end with an ellipsis",
    "gopher_below_alpha_threshold": "Gopher: too few words contain a letter",
    "gopher_enough_stop_words": "Gopher: too few English stop words",
    # datatrove's Gopher repetition filter (same paper)
    "dup_line_frac": "Gopher repetition: too many duplicated lines",
    "dup_para_frac": "Gopher repetition: too many duplicated paragraphs",
    "dup_line_char_frac": "Gopher repetition: too many characters in duplicated lines",
    "dup_para_char_frac": "Gopher repetition: too many characters in duplicated paragraphs",
    # datatrove's C4 filter (Raffel et al. 2020)
    "lorem_ipsum": "C4: contains \"lorem ipsum\"",
    "curly_bracket": "C4: contains a curly bracket (code-like)",
    "too_few_sentences": "C4: too few sentences",
    "document_removed_with_badwords": "C4: contains a word on the bad-words list",
    # datatrove's FineWeb filter (Penedo et al. 2024)
    "line_punct_ratio": "FineWeb: too few lines end in punctuation",
    "short_line_ratio": "FineWeb: too many short lines",
    "char_dup_ratio": "FineWeb: too many characters in duplicated lines",
    "list_ratio": "FineWeb: too many lines that look like a list",
    # filters.py (The Stack / StarCoder's rules for source files)
    "code_long_line": "code: a line over 1,000 characters (minified or embedded data)",
    "code_long_lines_mean": "code: mean line length over 100",
    "code_low_alnum": "code: under 25% alphanumeric characters",
    "code_autogenerated": "code: an auto-generated marker in the first 5 lines",
    "code_data_like": "code: mostly literal-only lines (number tables, byte arrays)",
}
# A reason that is not listed is described by its family, when its name carries one.
FAMILIES = {
    "gopher_": "Gopher quality or repetition filter",
    "c4_": "C4 filter",
    "fineweb_": "FineWeb filter",
    "code_": "code filter",
    "url_": "URL blocklist",
    "top_": "Gopher repetition: the most frequent n-gram covers too much of the text",
    "duplicated_": "Gopher repetition: too much of the text is in duplicated n-grams",
}
MODIFICATIONS = {
    "repaired_unicode": "documents whose text ftfy repaired (mojibake, entities, control characters)",
    "whitespace_normalised": "documents whose line ends, trailing or repeated whitespace were normalised",
    "decoded_fallback": "HTML pages read as windows-1252, their declared charset not fitting their bytes",
    **{f"redacted_{kind}": f"replaced by `{placeholder}` (counts items, not documents)"
       for kind, placeholder in PLACEHOLDERS.items()},
}
# Each split's colour in lengths.png.
SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange"}


def describe_reason(reason: str) -> str:
    """One line on what a drop reason means; '' for a reason nobody foresaw."""
    if reason in REASONS:
        return REASONS[reason]
    for prefix, family in FAMILIES.items():
        if reason.startswith(prefix):
            specific = REASONS.get(reason[len(prefix):])  # "fineweb_line_punct_ratio" -> "line_punct_ratio"
            return specific or family
    return ""


# ----------------------------------------------------------------------------- TOML (no writer installed)

def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr(1e-05) == "1e-05", nan and inf are spelled as TOML spells them
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON's string escapes are a subset of TOML's basic strings
    return json.dumps(str(value), ensure_ascii=False)


def toml_text(config: dict, table: str = "") -> str:
    """config as TOML: scalars, strings and lists; nested dicts become [tables]; None (TOML has no null)
    becomes a comment, so the text still shows the setting was unset."""
    lines, tables = [], []
    for key, value in config.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is None:
            lines.append(f"# {_toml_key(key)} = (unset)")
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables:
        name = f"{table}.{_toml_key(key)}" if table else _toml_key(key)
        lines += ["", f"[{name}]", toml_text(value, name)]
    return "\n".join(lines).strip("\n")


# ----------------------------------------------------------------------------- pictures

def drop_bars(dropped: dict[str, int], kept: int, max_reason_bars: int = MAX_REASON_BARS) -> list[tuple[str, int]]:
    """The bars of drop_reasons.png, top to bottom: kept, then reasons by count, the smallest beyond
    max_reason_bars summed into one "other (N reasons)" bar."""
    reasons = sorted(((r, n) for r, n in dropped.items() if n), key=lambda rn: (-rn[1], rn[0]))
    if len(reasons) > max_reason_bars:
        rest = reasons[max_reason_bars - 1:]
        reasons = reasons[:max_reason_bars - 1] + [(f"other ({len(rest)} reasons)", sum(n for _, n in rest))]
    return [("kept", kept)] + reasons


def plot_drop_reasons(counts: dict, out_png: Path) -> list[tuple[str, int]]:
    """Horizontal bars of where the documents went; returns the bars drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    bars = drop_bars(counts["dropped"], counts["kept"])
    total = max(1, counts["documents_in"])
    labels, values = [b[0] for b in bars], [b[1] for b in bars]
    colours = ["tab:green"] + ["tab:gray" if lb.startswith("other (") else "tab:red" for lb in labels[1:]]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 1.2 + 0.28 * len(bars))), dpi=110)
    y = np.arange(len(bars))
    ax.barh(y, values, color=colours)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()  # kept on top, then the largest drop
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,} ({v / total:.1%})", va="center", fontsize=8)
    ax.set_xlim(0, max(1, max(values)) * 1.3)  # room for the counts at the bar ends
    ax.set_xlabel(f"documents (of {counts['documents_in']:,} in)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Where the documents went: nothing dropped" if len(bars) == 1 else
                 "Where the documents went: kept, or dropped by reason")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return bars


def plot_lengths(lengths: dict[str, np.ndarray], out_png: Path) -> None:
    """Per-split histograms of document length in tokens: log-spaced bins on a log axis, each split
    normalised to fractions of its own documents so the small held-out split shows; medians dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    shown = {split: np.asarray(x) for split, x in lengths.items() if len(x)}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if shown:
        lo = max(1, min(int(x.min()) for x in shown.values()))  # a log axis has no 0
        hi = max(lo + 1, max(int(x.max()) for x in shown.values()))
        bins = np.logspace(np.log10(lo), np.log10(hi + 1), 41)
        for i, (split, x) in enumerate(shown.items()):
            colour = SPLIT_COLOURS.get(split, f"C{i + 2}")
            # weights rather than density=True: density divides by bin width, which on log bins
            # piles the mass onto the short documents; this way each bar is a fraction of the split
            ax.hist(np.clip(x, lo, None), bins=bins, weights=np.full(len(x), 1 / len(x)), histtype="stepfilled",
                    facecolor=to_rgba(colour, 0.3), edgecolor=colour, linewidth=1.2,
                    label=f"{split} ({len(x):,} documents)")
            median = float(np.median(x))
            ax.axvline(median, color=colour, linestyle="--", linewidth=1.2, label=f"{split} median {median:,.0f}")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no documents kept", transform=ax.transAxes, ha="center", fontsize=11)
    ax.set_xlabel("document length (tokens, log scale)")
    ax.set_ylabel("fraction of the split's documents")
    ax.grid(alpha=0.3)
    ax.set_title("Document lengths of the kept documents")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


# ----------------------------------------------------------------------------- the card

def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def funnel_rows(stages: list[dict]) -> list[tuple[str, int, dict, int, float | None]]:
    """(stage, in, dropped by reason, out, seconds) for each stage, out = in - its drops."""
    return [(s["name"], s["documents_in"], s.get("dropped", {}), s["documents_in"] - sum(s.get("dropped", {}).values()),
             s.get("seconds")) for s in stages]


def accounting_problems(manifest: dict) -> list[str]:
    """Every way the counts fail to add up; [] when they do (which is always, unless a step miscounts)."""
    counts = manifest["counts"]
    num_in, kept, dropped = counts["documents_in"], counts["kept"], sum(counts["dropped"].values())
    problems = []
    if num_in != kept + dropped:
        problems.append(f"documents in ({num_in:,}) != kept ({kept:,}) + dropped ({dropped:,}) = {kept + dropped:,}: "
                        f"{num_in - kept - dropped:+,} documents unaccounted for")
    by_split = sum(counts.get("kept_by_split", {}).values())
    if counts.get("kept_by_split") and by_split != kept:
        problems.append(f"kept ({kept:,}) != the splits' documents ({by_split:,})")
    rows = funnel_rows(manifest.get("stages", []))
    if rows and rows[0][1] != num_in:
        problems.append(f"the first stage ({rows[0][0]}) reads {rows[0][1]:,} documents, not the {num_in:,} counted in")
    for (name, _, _, out, _), (next_name, next_in, _, _, _) in zip(rows, rows[1:]):
        if out != next_in:
            problems.append(f"stage {name} passes on {out:,} documents but stage {next_name} receives {next_in:,}")
    if rows and rows[-1][3] != kept:
        problems.append(f"the last stage ({rows[-1][0]}) passes on {rows[-1][3]:,} documents, not the {kept:,} kept")
    return problems


def _length_table(lengths: dict[str, np.ndarray]) -> list[str]:
    lines = ["| split | documents | p5 | median | p95 | max | mean |", "|---|---|---|---|---|---|---|"]
    for split, x in lengths.items():
        x = np.asarray(x)
        if not len(x):
            lines.append(f"| {split} | 0 | - | - | - | - | - |")
            continue
        p5, p50, p95 = np.percentile(x, [5, 50, 95])
        lines.append(f"| {split} | {len(x):,} | {p5:,.0f} | {p50:,.0f} | {p95:,.0f} | {int(x.max()):,} | "
                     f"{x.mean():,.1f} |")
    return lines


def write_data_card(out_dir: Path, manifest: dict, lengths: dict[str, np.ndarray]) -> Path:
    """data_card.md, lengths.png and drop_reasons.png in out_dir; returns the card's path."""
    out_dir = Path(out_dir)
    counts, splits, tok = manifest["counts"], manifest["splits"], manifest["tokenizer"]
    num_in, kept = counts["documents_in"], counts["kept"]
    dropped = dict(sorted(counts["dropped"].items(), key=lambda rn: (-rn[1], rn[0])))
    num_dropped = sum(dropped.values())
    plot_lengths(lengths, out_dir / "lengths.png")
    plot_drop_reasons(counts, out_dir / "drop_reasons.png")
    problems = accounting_problems(manifest)
    pct = lambda n: f"{n / max(1, num_in):.1%}"

    num_tokens = sum(s["num_tokens"] for s in splits.values())
    num_bytes = sum(s["num_bytes"] for s in splits.values())
    num_inputs = len(manifest["inputs"])
    per_split = "; ".join(f"{name} {s['num_documents']:,} documents, {s['num_tokens']:,} tokens"
                          for name, s in splits.items())
    lines = [f"# Data card: {out_dir.name}", ""]
    if problems:
        lines += ["> **WARNING: THE ACCOUNTING DOES NOT ADD UP. Documents were lost or double counted; do not "
                  "train on this data until it is explained.**", ">",
                  *(f"> - **{p}**" for p in problems), ""]
    lines += [
        f"{num_in:,} documents in from {num_inputs} input{'s' * (num_inputs != 1)}; {kept:,} kept ({pct(kept)}), "
        f"{num_dropped:,} dropped ({pct(num_dropped)}). Kept: {per_split or 'no splits'}. "
        f"{num_tokens:,} tokens in all, {num_bytes / max(1, num_tokens):.2f} bytes of text per token "
        f"(tokenizer of {tok.get('vocab_size', 0):,} tokens). Made {manifest['created']} by lmforge "
        f"{manifest['lmforge_version']} in {manifest['seconds']:.1f} s ({manifest['tasks']} tasks, "
        f"{manifest['workers']} workers).",
        "",
        (f"Accounting: documents in = kept + dropped: {num_in:,} = {kept:,} + {num_dropped:,}."
         if num_in == kept + num_dropped else
         f"**Accounting: documents in = kept + dropped DOES NOT HOLD: {num_in:,} != {kept:,} + {num_dropped:,} "
         f"= {kept + num_dropped:,}.**"),
        "",
        "## Inputs",
        "",
        "| path | kind | files | bytes |",
        "|---|---|---|---|",
        *(f"| `{_cell(i['path'])}` | {i['kind']} | {i['num_files']:,} | {i['num_bytes']:,} |"
          for i in manifest["inputs"]),
        "",
    ]
    if counts.get("skipped"):
        lines += ["WARC records that are not documents, skipped before counting: "
                  + ", ".join(f"{kind} {n:,}" for kind, n in counts["skipped"].items()) + ".", ""]

    lines += ["## Where the documents went", "",
              "| stage | in | dropped | out | seconds |", "|---|---|---|---|---|"]
    for name, n, stage_dropped, out, seconds in funnel_rows(manifest.get("stages", [])):
        reasons = ", ".join(f"`{_cell(r)}` {c:,}" for r, c in sorted(stage_dropped.items(), key=lambda rc: -rc[1]) if c)
        lines.append(f"| {_cell(name)} | {n:,} | {reasons or '-'} | {out:,} | "
                     f"{'-' if seconds is None else f'{seconds:.1f}'} |")
    lines += ["", "![where the documents went](drop_reasons.png)", "", "## Dropped, by reason", ""]
    if dropped:
        lines += ["| reason | documents | % of input | meaning |", "|---|---|---|---|",
                  *(f"| `{_cell(r)}` | {n:,} | {pct(n)} | {describe_reason(r)} |" for r, n in dropped.items()),
                  f"| **all** | **{num_dropped:,}** | **{pct(num_dropped)}** | |"]
    else:
        lines.append("Nothing dropped: every document read was kept.")
    problems = manifest.get("problems", [])
    if problems:  # bad input (binary, not UTF-8, cut short, ...): each named, so it can be found and fixed
        shown = problems[:MAX_PROBLEMS_LISTED]
        lines += ["", f"### Bad input ({len(problems):,}, each dropped above)", "",
                  "| file | where | reason | detail |", "|---|---|---|---|",
                  *(f"| `{_cell(p['file'])}` | {_cell(p['position'])} | `{p['reason']}` | {_cell(p['detail'])} |"
                    for p in shown)]
        if len(problems) > len(shown):
            lines.append(f"\n... and {len(problems) - len(shown):,} more, all in manifest.json (\"problems\").")
    lines += ["", "## Modified but kept", ""]
    if counts.get("modified"):
        lines += ["| change | count | meaning |", "|---|---|---|",
                  *(f"| `{_cell(m)}` | {n:,} | {MODIFICATIONS.get(m, '')} |" for m, n in counts["modified"].items())]
    else:
        lines.append("No document was changed.")
    lines += ["", "## Lengths", "", "Tokens per kept document.", "", "![document lengths](lengths.png)", "",
              *_length_table(lengths), ""]

    lines += ["## Tokenizer", "",
              f"`{tok.get('file', '?')}`: {tok.get('vocab_size', 0):,} tokens, "
              f"{'trained on this corpus' if tok.get('trained') else 'given, not trained here'}; "
              f"sha256 `{tok.get('sha256', '?')}`.", ""]
    lines += ["## Splits", "",
              "| split | documents | tokens | bytes | bytes/token | shards |", "|---|---|---|---|---|---|",
              *(f"| {name} | {s['num_documents']:,} | {s['num_tokens']:,} | {s['num_bytes']:,} | "
                f"{s['num_bytes'] / max(1, s['num_tokens']):.2f} | {s['num_shards']} |" for name, s in splits.items()),
              ""]
    lines += ["## Reproduce", "", "The run's settings:", "", "```toml", toml_text(manifest["config"]), "```", "",
              "| file | sha256 |", "|---|---|",
              *(f"| `{_cell(f)}` | `{h}` |" for f, h in manifest["files"].items()), ""]
    lines += ["## Caveats", "",
              "This card lists what the filters measured and counted; it is not a human review of the content. "
              "Documents that passed every filter can still be wrong, offensive, copyrighted or personal in ways no "
              "filter here looks for.", ""]
    path = out_dir / "data_card.md"
    path.write_text("\n".join(lines))
    return path
