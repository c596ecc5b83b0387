"""Word geometry of a model: nearest neighbours and 3CosAdd analogies, on the input embedding matrix
or on the residual stream at a chosen layer.

A *word* is a single token. `word_id` tries the word with a leading space first (" king"), because
byte-level BPE vocabularies store a word as it appears mid-sentence, then the bare form ("king").
A word that is several tokens either way is refused (LmforgeError naming the word) rather than
averaged: a mean of sub-word pieces is a different object from a learned word vector, and mixing
the two would blur what the accuracy measures.

A `WordSpace` is a set of candidate words with one unit vector each:
- `embedding_space`: rows of `embed_tokens.weight`. Its candidates are exactly the *letters-only
  vocabulary words*: every string w with w.isalpha() such that " w" or "w" is a token of the
  vocabulary (its bytes decode as UTF-8), represented by word_id(w) when that is defined.
- `residual_space`: for each given word, the residual stream entering layer L
  (`blocks.{L}.hook_resid_pre`) at the word's position when it is run alone as a context, after
  BOS when the tokenizer has one ([BOS, w], else [w]). Running the whole vocabulary through the
  model would cost a forward pass per word, so its candidates are the words given (in the
  analogy benchmark: the single-token words of the analogy file's vocabulary).

3CosAdd (Mikolov, Yih & Zweig 2013, "Linguistic regularities in continuous space word
representations"; the name from Levy & Goldberg 2014): a : b :: c : ? is answered by
argmax_x cos(x, b^ - a^ + c^) over the candidates x other than a, b and c, where v^ is v / |v|.
As in word2vec's compute-accuracy and gensim, the three inputs are excluded; without that rule
the answer is usually b or c itself.

The analogy file is word2vec's questions-words.txt format: `: section` lines, then `a b c d`
lines (a : b :: c : d). Shape legend: N candidate words, D hidden_size, Q questions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError

MAX_ANALOGY_FILE_BYTES = 16 * 2**20  # questions-words.txt is 0.6 MB; 16 MiB bounds a hostile file


def word_id(tokenizer, word: str) -> int:
    """The single token for `word`: " word" if that is one token, else "word"; LmforgeError if neither."""
    found = _word_id_or_none(tokenizer, word)
    if found is None:
        raise LmforgeError(f"{word!r} is not a single token in this vocabulary (neither {' ' + word!r} nor "
                           f"{word!r}); give a word that is one token (multi-token words are refused, not averaged)")
    return found


def _word_id_or_none(tokenizer, word: str) -> int | None:
    if not word or word != word.strip():
        return None
    for form in (" " + word, word):
        ids = tokenizer.encode(form)
        if len(ids) == 1:
            return ids[0]
    return None


def vocab_words(tokenizer) -> dict[str, int]:
    """The letters-only vocabulary words -> their word_id (see the module doc for the exact rule)."""
    words = set()
    for i in range(tokenizer.vocab_size):
        try:
            text = tokenizer.id_to_bytes(i).decode("utf-8")
        except (UnicodeDecodeError, LmforgeError):  # a partial UTF-8 piece, or an unused id
            continue
        w = text[1:] if text.startswith(" ") else text
        if w.isalpha():
            words.add(w)
    out = {}
    for w in sorted(words):
        i = _word_id_or_none(tokenizer, w)
        if i is not None:
            out[w] = i
    return out


@dataclass
class WordSpace:
    """Candidate words, their token ids and their unit vectors (N, D)."""
    words: list[str]
    ids: list[int]
    vectors: torch.Tensor  # (N, D), each row of norm 1
    row: dict[str, int] = field(init=False)

    def __post_init__(self):
        assert self.vectors.shape[0] == len(self.words) == len(self.ids)
        self.row = {w: r for r, w in enumerate(self.words)}

    def index(self, word: str) -> int:
        if word not in self.row:
            raise LmforgeError(f"{word!r} is not among this space's {len(self.words)} candidate words; give a "
                               "single-token word (for a residual-stream space: one of the words it was built on)")
        return self.row[word]


def _space(words: dict[str, int], vectors: torch.Tensor) -> WordSpace:
    return WordSpace(list(words), list(words.values()), F.normalize(vectors.float(), dim=-1))


def embedding_space(model, tokenizer, words: dict[str, int] | None = None) -> WordSpace:
    """Rows of the input embedding matrix for `words` (word -> id; default: vocab_words(tokenizer))."""
    words = vocab_words(tokenizer) if words is None else words
    if not words:
        raise LmforgeError("no single-token words to compare; this vocabulary has no letters-only word tokens")
    weight = model.model.embed_tokens.weight.detach()  # (V, D)
    return _space(words, weight[torch.tensor(list(words.values()), device=weight.device)].cpu())


def residual_space(hooked, tokenizer, words: dict[str, int], layer: int, batch_size: int = 256) -> WordSpace:
    """blocks.{layer}.hook_resid_pre at each word's position in [BOS, w] (or [w] without a BOS)."""
    n_layers = hooked.config.num_hidden_layers
    if not 0 <= layer <= n_layers:
        raise LmforgeError(f"--layer {layer} is out of range; this model's residual stream is read before "
                           f"layers 0..{n_layers - 1} (or {n_layers}: after the last block)")
    if not words:
        raise LmforgeError("no single-token words to build the residual-stream space on")
    bos = tokenizer.bos_id
    device = hooked.model.lm_head.weight.device
    ids = torch.tensor(list(words.values()), device=device)[:, None]  # (N, 1)
    if bos is not None:
        ids = torch.cat([torch.full_like(ids, bos), ids], dim=1)  # (N, 2)
    parts = []
    with torch.no_grad():
        for chunk in ids.split(batch_size):
            # stop_at_layer returns the stream entering that layer: blocks.{layer}.hook_resid_pre
            parts.append(hooked(chunk, stop_at_layer=layer)[:, -1].float().cpu())  # (n, D)
    return _space(words, torch.cat(parts))


def nearest(space: WordSpace, word: str, k: int = 10) -> list[tuple[str, float]]:
    """The k candidates with the highest cosine to `word` (the word itself excluded)."""
    r = space.index(word)
    cos = space.vectors @ space.vectors[r]  # (N,)
    cos[r] = -float("inf")
    top = cos.topk(min(k, len(space.words) - 1))
    return [(space.words[i], float(v)) for v, i in zip(top.values, top.indices)]


def _targets(space: WordSpace, rows: torch.Tensor) -> torch.Tensor:
    """rows (Q, 3) of a, b, c -> cosines (Q, N) of every candidate with b^ - a^ + c^, inputs at -inf."""
    v = space.vectors
    target = v[rows[:, 1]] - v[rows[:, 0]] + v[rows[:, 2]]  # (Q, D); its norm does not move the argmax,
    cos = F.normalize(target, dim=-1) @ v.T                 # but normalising makes the scores cosines
    return cos.scatter(1, rows, -float("inf"))


def analogy(space: WordSpace, a: str, b: str, c: str, k: int = 5) -> list[tuple[str, float]]:
    """a : b :: c : ? by 3CosAdd: the top k candidates (a, b, c excluded) with their cosines."""
    rows = torch.tensor([[space.index(a), space.index(b), space.index(c)]])
    cos = _targets(space, rows)[0]
    top = cos.topk(min(k, len(space.words) - 3))
    return [(space.words[i], float(v)) for v, i in zip(top.values, top.indices)]


def analogy_rank(space: WordSpace, a: str, b: str, c: str, d: str) -> int:
    """1-based rank of d among the candidates for a : b :: c : ? (1 = 3CosAdd's answer)."""
    rows = torch.tensor([[space.index(a), space.index(b), space.index(c)]])
    cos = _targets(space, rows)[0]
    return int((cos > cos[space.index(d)]).sum()) + 1


# -- the analogy file and its accuracy ------------------------------------------------------------

@dataclass
class AnalogySet:
    """Questions (a, b, c, d) by section, with each skipped line counted by its reason."""
    sections: dict[str, list[tuple[str, str, str, str]]]
    skipped: dict[str, int]
    num_lines: int

    def words(self) -> set[str]:
        return {w for qs in self.sections.values() for q in qs for w in q}


def read_analogies(path: str | os.PathLike, tokenizer, max_bytes: int = MAX_ANALOGY_FILE_BYTES) -> AnalogySet:
    """Parse a questions-words.txt-style file, keeping the questions whose four words are single tokens.

    Skipped lines are counted by reason: "malformed" (not four words, or a question before any
    `: section`), "not single-token" (a word that word_id refuses). Blank lines are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"analogy file {path} not found; give a questions-words.txt-style file")
    if path.stat().st_size > max_bytes:
        raise LmforgeError(f"analogy file {path} is {path.stat().st_size} bytes, over the {max_bytes}-byte "
                           "limit; give a smaller file")
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)  # the file may grow between stat and read
    if len(raw) > max_bytes:
        raise LmforgeError(f"analogy file {path} is over the {max_bytes}-byte limit; give a smaller file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"analogy file {path} is not UTF-8 text (byte {e.start}); give a "
                           "questions-words.txt-style text file") from None
    sections: dict[str, list] = {}
    skipped = {"malformed": 0, "not single-token": 0}
    known: dict[str, int | None] = {}
    section, lines = None, text.splitlines()
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            section = line[1:].strip() or "(unnamed)"
            sections.setdefault(section, [])
            continue
        parts = line.split()
        if len(parts) != 4 or section is None:
            skipped["malformed"] += 1
            continue
        for w in parts:
            if w not in known:
                known[w] = _word_id_or_none(tokenizer, w)
        if any(known[w] is None for w in parts):
            skipped["not single-token"] += 1
            continue
        sections[section].append(tuple(parts))
    return AnalogySet(sections, skipped, len(lines))


def file_words(analogies: AnalogySet, tokenizer) -> dict[str, int]:
    """The single-token words of the kept questions -> word_id: the residual-stream candidate set."""
    return {w: word_id(tokenizer, w) for w in sorted(analogies.words())}


@dataclass
class AnalogyResult:
    correct: dict[str, int]   # by section
    total: dict[str, int]     # by section (questions whose four words are candidates)
    not_candidates: int       # kept questions skipped here: a word outside this space's candidates

    @property
    def accuracy(self) -> float:
        n = sum(self.total.values())
        return sum(self.correct.values()) / n if n else float("nan")

    def section_accuracy(self, section: str) -> float:
        return self.correct[section] / self.total[section] if self.total[section] else float("nan")


def analogy_accuracy(space: WordSpace, analogies: AnalogySet, batch_size: int = 512) -> AnalogyResult:
    """Top-1 3CosAdd accuracy by section: the question counts as right when d is the argmax (a, b, c excluded)."""
    correct, total, outside = {}, {}, 0
    for section, questions in analogies.sections.items():
        kept = [q for q in questions if all(w in space.row for w in q)]
        outside += len(questions) - len(kept)
        correct[section], total[section] = 0, len(kept)
        for start in range(0, len(kept), batch_size):
            rows = torch.tensor([[space.row[w] for w in q] for q in kept[start:start + batch_size]])  # (Q, 4)
            guess = _targets(space, rows[:, :3]).argmax(dim=1)  # (Q,)
            correct[section] += int((guess == rows[:, 3]).sum())
    if not sum(total.values()):
        raise LmforgeError("no analogy question has all four words among the candidates; check the file and "
                           "that its words are single tokens in this vocabulary")
    return AnalogyResult(correct, total, outside)
