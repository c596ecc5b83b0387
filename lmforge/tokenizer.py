"""Byte-level BPE tokenizer: trained with Hugging Face `tokenizers`, encoded with `tiktoken`.

Design
- Training uses HF `tokenizers` because its BPE trainer is fast (Rust, parallel) and its
  `tokenizer.json` is the format every other tool reads, so the saved file *is* the export.
- Encoding uses `tiktoken` because it is several times faster than HF's encoder on one thread
  (the data stage tokenizes whole corpora). Both paths are built from the same ranks and must give
  identical ids; `encode_hf` keeps the slow path around for parity tests and debugging.
- Byte-level: every one of the 256 bytes is a token, so any text encodes without an <unk> and
  `decode(encode(s)) == s` for every str (lone surrogates aside, which UTF-8 cannot carry).
- Pre-tokenization is the GPT-4 (cl100k) split pattern: text is cut into words, number runs of at
  most 3 digits, punctuation runs and whitespace runs, and merges never cross those cuts.
- Special tokens are trained *without*, then appended at the end of the id space. The mergeable
  tokens are then exactly ids 0..N-1 with rank == id, which is what tiktoken's `mergeable_ranks`
  needs, and adding or changing a special token never renumbers the ordinary vocabulary.

HF vs tiktoken, the one trap: tiktoken merges any two adjacent parts whose concatenation is a token
(priority = that token's rank), while HF BPE applies only the (left, right) pairs in its merge list,
and the trainer records one pair per token. A part sequence reached another way ("a"+"bc" for a
token trained as "ab"+"c") would merge in tiktoken but not in HF. The greedy training order makes
this rare (we found no case on the stdlib), but rather than rely on it we rewrite the HF merge list
from the ranks: every split of every token into two tokens, ordered by the token's rank, with
`ignore_merges=True` (a pre-token that is itself a token is taken whole, as tiktoken does). The
two encoders then follow the same rule by construction, and the saved file encodes as we do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tiktoken
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.common import LmforgeError, atomic_write_text

# GPT-4's cl100k_base split: English contractions, letter runs (with one leading non-letter such as
# a space), digit runs of 1-3, punctuation runs, and whitespace runs that leave their last space to
# the following word. nanochat uses \p{N}{1,2} to spare a small vocabulary the 1000 three-digit
# numbers; we keep GPT-4's {1,3}, which compresses numbers better once vocabularies reach ~32k.
#
# Written for speed, it matches exactly what GPT4_SPLIT_PATTERN matches (tests check this). tiktoken's
# regex engine (fancy-regex) runs a pattern with lookaround or possessive quantifiers in a slow
# backtracking VM, handing only lookaround-free groups to the fast `regex` crate. So: (1) the
# possessive `?+`/`++` are dropped, which changes nothing because each is followed by something its
# class cannot match, so there is never anything to backtrack into; (2) the five lookaround-free
# alternatives are grouped so they are handed over as one. 1.8x faster encoding on the stdlib.
SPLIT_PATTERN = (
    r"""(?:'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n])"""
    r"""|(?:\s+(?!\S))|(?:\s+)"""
)
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system_start|>",
    "<|system_end|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_result_start|>",
    "<|tool_result_end|>",
)

NUM_BYTES = 256


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, as HF's ByteLevel uses it.

    Bytes that are already printable, non-space Latin-1 characters stand for themselves; the other
    68 (controls, space, soft hyphen, ...) are shifted to U+0100 onward in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(NUM_BYTES) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(NUM_BYTES + n)
    return table


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _to_bytes(symbol: str) -> bytes:
    return bytes(UNICODE_TO_BYTE[c] for c in symbol)


def _to_symbol(token: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, by the token's rank: tiktoken's rule as HF merges."""
    merges = []
    for token, _rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(left, right) for left, right in splits if left in ranks and right in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((_to_symbol(left), _to_symbol(right)) for left, right in splits)
    return merges


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN), behavior="isolated"),
        # use_regex=False: the split above already did GPT-2's job; this only maps bytes to symbols.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _build_hf(ranks: dict[bytes, int]) -> tokenizers.Tokenizer:
    """The HF tokenizer for mergeable `ranks` (ids 0..N-1) plus SPECIAL_TOKENS at ids N.."""
    vocab = {_to_symbol(token): rank for token, rank in ranks.items()}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_ranks(ranks), ignore_merges=True))
    hf.pre_tokenizer = _pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return hf


def _split_pattern_of(spec: dict) -> str | None:
    """The split regex of a tokenizer.json whose text pipeline is `_pre_tokenizer()`'s, else None.

    Anything else (a normalizer, a prefix space, GPT-2's own regex) would make HF's ids differ
    from tiktoken's, which sees only the split regex.
    """
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if spec.get("normalizer") or [step.get("type") for step in steps] != ["Split", "ByteLevel"]:
        return None
    split, byte_level = steps
    if split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    return split.get("pattern", {}).get("Regex")


class Tokenizer:
    """A trained byte-level BPE with SPECIAL_TOKENS at the end of the id space.

    Build one with `Tokenizer.train` or `Tokenizer.load`; the constructor takes an HF tokenizer
    in lmforge's layout and checks that it is one.
    """

    def __init__(self, hf: tokenizers.Tokenizer, *, source: str = "tokenizer"):
        spec = json.loads(hf.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise LmforgeError(f"{source}: not a BPE tokenizer.json; train one: `lmforge tokenizer train`")
        try:
            ranks = {_to_bytes(symbol): rank for symbol, rank in model["vocab"].items()}
        except KeyError:
            raise LmforgeError(
                f"{source}: vocabulary is not byte-level BPE; train one with `lmforge tokenizer train`"
            ) from None
        split_pattern = _split_pattern_of(spec)
        if split_pattern is None:
            raise LmforgeError(
                f"{source}: pre-tokenizer is not lmforge's (regex split, then byte-level); "
                "train a tokenizer with `lmforge tokenizer train`"
            )
        num_mergeable = len(ranks)
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        expected = {s: num_mergeable + i for i, s in enumerate(SPECIAL_TOKENS)}
        if sorted(ranks.values()) != list(range(num_mergeable)) or specials != expected:
            raise LmforgeError(
                f"{source}: ids are not lmforge's layout (bytes and merges 0..N-1, then "
                f"{len(SPECIAL_TOKENS)} special tokens); train a tokenizer with `lmforge tokenizer train`"
            )
        self._hf = hf
        # HF would otherwise cut "<|bos|>" out of ordinary text; encode_hf matches `encode` instead.
        self._hf.encode_special_tokens = True
        self._enc = tiktoken.Encoding(
            "lmforge",
            # The file's own pattern, not SPLIT_PATTERN: a saved tokenizer encodes the same forever.
            pat_str=split_pattern,
            mergeable_ranks=ranks,
            special_tokens=specials,
            explicit_n_vocab=num_mergeable + len(specials),
        )
        self.special_ids: dict[str, int] = dict(specials)
        self._token_byte_lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, rank in ranks.items():
            self._token_byte_lengths[rank] = len(token)

    # ------------------------------------------------------------------------- building

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
        """Train on `texts` to `vocab_size` ids in total, special tokens included.

        A corpus too small to supply enough merges gives a smaller vocabulary: read `.vocab_size`.
        """
        min_vocab_size = NUM_BYTES + len(SPECIAL_TOKENS) + 1
        if vocab_size < min_vocab_size:
            raise LmforgeError(
                f"vocab_size={vocab_size} leaves no room for merges: 256 byte tokens and "
                f"{len(SPECIAL_TOKENS)} special tokens are always present; use vocab_size >= {min_vocab_size}"
            )
        if isinstance(texts, str):
            raise LmforgeError("Tokenizer.train(texts=...): pass an iterable of documents, not one string")
        num_chars = 0

        def counted(docs: Iterable[str]) -> Iterator[str]:
            nonlocal num_chars
            for doc in docs:
                num_chars += len(doc)
                yield doc

        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = _pre_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL_TOKENS),
            show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        hf.train_from_iterator(counted(texts), trainer)
        if num_chars == 0:
            raise LmforgeError("Tokenizer.train got no text (empty input); pass non-empty documents")
        vocab = json.loads(hf.to_str())["model"]["vocab"]
        ranks = {_to_bytes(symbol): rank for symbol, rank in vocab.items()}
        return cls(_build_hf(ranks))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json`, given as the file or as a folder that holds it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise LmforgeError(f"{path}: no tokenizer file here; train one with `lmforge tokenizer train`")
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise LmforgeError(
                f"{path}: not a readable tokenizer.json ({e}); retrain it or restore it from a checkpoint"
            ) from None
        return cls(hf, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write the HF `tokenizer.json` atomically (a crash never leaves half a file)."""
        atomic_write_text(path, self._hf.to_str(pretty=True))

    def export_hf(self, out_dir: str | os.PathLike, *, model_max_length: int | None = None) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` for `transformers.AutoTokenizer`."""
        out_dir = Path(out_dir)
        self.save(out_dir / "tokenizer.json")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[0],
            "eos_token": SPECIAL_TOKENS[1],
            "pad_token": SPECIAL_TOKENS[2],
            # Byte-level BPE decodes exactly; the "cleanup" would delete spaces before punctuation.
            "clean_up_tokenization_spaces": False,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    # ------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def special_token_id(self, name: str) -> int:
        if name not in self.special_ids:
            raise LmforgeError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self.special_ids[name]

    @property
    def bos_id(self) -> int:
        return self.special_ids["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["<|eos|>"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["<|pad|>"]

    def id_to_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for; a special token gives its string's UTF-8 (e.g. b"<|bos|>")."""
        return self.decode_bytes([i])

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: UTF-8 bytes per token, 0 for special tokens (bits-per-byte denominator)."""
        return self._token_byte_lengths.copy()

    # ------------------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Ids for ordinary text; special-token strings inside it are encoded as plain text."""
        return self._enc.encode_ordinary(text)

    def encode_with_special(self, text: str) -> list[int]:
        """Like `encode`, but each special-token string in `text` becomes its single id (chat templates)."""
        return self._enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_hf(self, text: str) -> list[int]:
        """The slow HF path; gives the same ids as `encode` (kept for parity tests and debugging)."""
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except TypeError:
            if not isinstance(text, str):
                raise
            # A str with surrogates cannot cross into Rust. tiktoken retries such text with lone
            # surrogates as U+FFFD and surrogate pairs joined into their character; so do we.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._hf.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            bad = [int(i) for i in ids if not 0 <= int(i) < self.vocab_size]
            raise LmforgeError(
                f"token ids {bad[:5]} are outside this tokenizer's vocabulary 0..{self.vocab_size - 1}; "
                "check that the model and tokenizer belong together"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; bytes that do not form whole UTF-8 characters (a cut sequence) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- playground view

# Light ANSI-256 backgrounds under black text: readable on dark and light terminals, and eight of
# them so neighbouring tokens never share a colour.
_PALETTE_256 = (153, 186, 217, 151, 223, 183, 159, 229)
_BLACK_256 = 16
# Token boundary mark without colour. Not "|": source code is full of "|" and "||".
TOKEN_SEPARATOR = "│"


def _visible(piece: str) -> str:
    """A token's text made safe and readable on a terminal.

    A newline shows as ↵ followed by a real line break (the layout of code stays recognisable);
    other control characters show as their Unicode control pictures (␍, ␀, ...) or as \\x escapes,
    so that a stray ESC or CR in the text cannot repaint the terminal.
    """
    out = []
    for ch in piece:
        code = ord(ch)
        if ch == "\n":
            out.append("↵\n")
        elif ch == "\t" or not (code < 0x20 or 0x7F <= code < 0xA0):
            out.append(ch)
        elif code < 0x20:
            out.append(chr(0x2400 + code))
        else:
            out.append(f"\\x{code:02x}")
    return "".join(out)


def render_tokens(tok: Tokenizer, text: str, *, color: bool = True, with_special: bool = False) -> str:
    """`text` cut into its tokens, then a line of ids and a summary line (`lmforge tokenizer show`).

    color=True gives each token a background from a rotating palette; color=False separates tokens
    with TOKEN_SEPARATOR ("│") instead. A token that holds only part of a multi-byte character
    shows the bytes it does hold as \\x escapes. with_special=True recognises special-token strings
    (chat templates).
    """
    ids = tok.encode_with_special(text) if with_special else tok.encode(text)
    pieces = [_visible(tok.id_to_bytes(i).decode("utf-8", errors="backslashreplace")) for i in ids]
    if color:
        # Colour each line of a token separately: a background left on across a line break
        # bleeds to the right edge of the terminal.
        shown = []
        for n, piece in enumerate(pieces):
            start = f"\x1b[48;5;{_PALETTE_256[n % len(_PALETTE_256)]}m\x1b[38;5;{_BLACK_256}m"
            shown.append("\n".join(f"{start}{line}\x1b[0m" if line else "" for line in piece.split("\n")))
        view = "".join(shown)
    else:
        view = TOKEN_SEPARATOR.join(pieces)
    num_bytes = len(text.encode("utf-8", errors="surrogatepass"))
    bytes_per_token = f"{num_bytes / len(ids):.2f}" if ids else "n/a"
    summary = f"{len(text)} characters, {num_bytes} bytes, {len(ids)} tokens, {bytes_per_token} bytes/token"
    return f"{view}\nids: {ids}\n{summary}"
