"""Text repair and whitespace normalisation, the first step after reading.

    Cleaner()   ftfy repairs mojibake ("CafÃ©" -> "Café"), HTML entities left in text, control
                characters and odd quotes; then line ends become "\\n", trailing spaces go, and runs of
                blank lines shrink to one (two in code), none at either end (code ends in one "\\n");
                in prose, leading and repeated spaces go too. Code (metadata format "code") keeps every
                line's indentation and its own characters: only line ends, trailing spaces and blank
                runs are touched.

Stats: `repaired_unicode` for each document ftfy changed, `whitespace_normalised` for each one the
whitespace pass changed, `dropped_empty` for a document with nothing left.
"""

from __future__ import annotations

import re

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

_TRAILING = re.compile(r"[ \t\f\v]+$", re.MULTILINE)
_LEADING = re.compile(r"^[ \t\f\v\u00a0\u3000]+", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_CODE_BLANK_RUNS = re.compile(r"\n{4,}")  # code keeps PEP 8's two blank lines
_INNER_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]{2,}")


def normalise_whitespace(text: str, code: bool = False) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING.sub("", text)
    if not code:  # prose: indentation and runs of spaces carry nothing
        text = _INNER_SPACES.sub(" ", _LEADING.sub("", text))
    text = (_CODE_BLANK_RUNS.sub("\n\n\n", text) if code else _BLANK_RUNS.sub("\n\n", text)).strip("\n")
    return text + "\n" if code and text else text  # a source file ends in one newline, as POSIX and PEP 8 have it


# What ftfy could change in ASCII text: control characters (terminal escapes included), and in prose,
# HTML entities. Anything else it repairs is non-ASCII. Text with none of these skips ftfy, which costs
# ~5 s per 30 MB (tests/test_dataprep_clean.py checks the shortcut against ftfy itself).
_ASCII_FTFY_TOUCHES = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def repair(text: str, code: bool = False) -> str:
    """ftfy's repairs; for code, only the encoding repairs (quotes, entities and width are the code's own)."""
    import ftfy

    if text.isascii() and not _ASCII_FTFY_TOUCHES.search(text) and (code or "&" not in text):
        return text
    if code:
        return ftfy.fix_text(text, unescape_html=False, uncurl_quotes=False, fix_latin_ligatures=False,
                             fix_character_width=False, fix_line_breaks=False, normalization=None)
    return ftfy.fix_text(text, fix_line_breaks=False)  # line ends are the whitespace pass's, counted there


class Cleaner(PipelineStep):
    name = "🧽 clean"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            with self.track_time():
                code = doc.metadata.get("format") == "code"
                repaired = repair(doc.text, code)
                if repaired != doc.text:
                    self.stat_update("repaired_unicode")
                cleaned = normalise_whitespace(repaired, code)
                if cleaned != repaired:
                    self.stat_update("whitespace_normalised")
            if not cleaned.strip():
                self.stat_update("dropped_empty")
                continue
            doc.text = cleaned
            yield doc
