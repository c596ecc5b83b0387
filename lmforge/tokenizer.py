"""Tokenizers: lmforge's byte-level BPE (trained with HF `tokenizers`, encoded with `tiktoken`), and
any Hugging Face `tokenizer.json` that open-weights models ship (`HFTokenizer`, `load_tokenizer`).

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
two encoders then follow the same rule by construction, and the saved file encodes as we do. (One
corner is argued, not proven: two *different* splits of one token side by side tie in tiktoken,
which takes the leftmost, while HF takes the earlier-listed split. A fuzz over 3,000 random BPE
vocabularies and 600,000 strings found no input where this changes the ids.)

Imported tokenizers (`HFTokenizer`, `load_tokenizer`)
- Open-weights models ship their own `tokenizer.json` + `tokenizer_config.json` (chat template,
  bos/eos). `load_tokenizer` returns a `Tokenizer` for a file in lmforge's layout and an
  `HFTokenizer` for any other, with the same interface. It encodes with HF `tokenizers` from the
  file as written, which is what `AutoTokenizer` does for a `PreTrainedTokenizerFast` folder.
  (transformers v5 rebuilds the pipeline of a *family* class such as `LlamaTokenizer` from its own
  defaults; for Llama 2's legacy files that drops a second "▁" before text that starts with a space,
  where the file, like SentencePiece itself, keeps it. The file is the model's ground truth.)
- `encode` treats special-token strings in the text as plain text, like `Tokenizer.encode`: that is
  HF's `split_special_tokens=True`. HF's default extracts them; `encode_with_special` does that.
  Added tokens that are not special (Qwen3's "<think>") are vocabulary and match in both.
- `id_to_bytes` gives the bytes a token adds to the text, so streaming output can join them.
  Byte-level vocabularies (GPT-2, Llama 3, Qwen) map symbols through GPT-2's byte table;
  SentencePiece-style BPE (Llama 2, Mistral, TinyLlama) maps "▁" to a space and "<0xNN>" (byte
  fallback) to that byte; added tokens give their UTF-8 content. The one difference from `decode`:
  a SentencePiece decoder strips the space the tokenizer prepended to the text, and the joined bytes
  keep it (" Hello" where `decode` gives "Hello"). A normalizer (Qwen's NFC) changes the text before
  it is cut, so the joined bytes are those of the normalized text.
- Llama 3's file is tiktoken's vocabulary converted the way we write ours: ranks == ids, the merges
  are every split of every token in rank order, `ignore_merges`, a Split regex and no normalizer.
  `_tiktoken_layout` checks exactly that, and such a file encodes on the tiktoken path (6x faster
  on one thread with Llama 3's pattern; ~1 s more to load); any other (GPT-2's regex, Qwen's NFC
  normalizer and one merge per token, SentencePiece) stays on HF's encoder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import tiktoken
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.base import LmforgeError, atomic_write_text

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

# lmforge's chat format as the Jinja template `transformers`' apply_chat_template renders:
# <|bos|>, then each message between its role's start/end tokens (a tool's reply between the
# tool_result pair); add_generation_prompt opens the assistant's turn. No whitespace between turns.
CHAT_TEMPLATE = (
    "<|bos|>"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|tool_result_start|>' + message['content'] + '<|tool_result_end|>' }}"
    "{% else %}"
    "{{ raise_exception('lmforge chats have system, user, assistant and tool messages, not ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)

NUM_BYTES = 256
# SentencePiece's word-boundary mark: SentencePiece-style vocabularies write a space as "▁".
SPIECE_SPACE = "\u2581"
# A SentencePiece byte-fallback token: "<0x0A>" is the single byte 0x0A.
BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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


def _tiktoken_layout(spec: dict) -> tuple[str, dict[bytes, int]] | None:
    """(split pattern, ranks) when tiktoken encodes this tokenizer.json as HF does, else None.

    The conditions are lmforge's own layout less its fixed special tokens: no normalizer, a regex
    split then byte-level symbols, ids 0..N-1 over all 256 bytes, `ignore_merges`, the merge list
    holding every split of every token in the merged token's rank order (so HF applies exactly the
    merges tiktoken would, in its order: see the module docstring), and added tokens that are all
    special, after the mergeable ids and matched verbatim (tiktoken has no lstrip or normalization).
    """
    split_pattern = _split_pattern_of(spec)
    model = spec.get("model") or {}
    if split_pattern is None or model.get("type") != "BPE" or not model.get("ignore_merges"):
        return None
    if any(model.get(key) for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix")):
        return None
    # Checked on the symbols, which stand for bytes one character each: a split of a symbol string
    # is a split of its bytes, and no conversion is paid (0.3 s for 32k tokens, Llama 3 has 128k).
    vocab: dict[str, int] = model["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))) or any(s not in vocab for s in BYTE_TO_UNICODE.values()):
        return None
    if not set("".join(vocab)) <= UNICODE_TO_BYTE.keys():
        return None
    verbatim = ("lstrip", "rstrip", "single_word", "normalized")
    for token in spec.get("added_tokens", []):
        if not token.get("special") or token["id"] < len(vocab) or any(token.get(key) for key in verbatim):
            return None
    # tokenizers writes a merge as ["a", "b"]; files from before 0.20 as "a b".
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    merged_ranks = [vocab.get(left + right, -1) for left, right in merges]
    every_split = {(symbol[:i], symbol[i:]) for symbol in vocab for i in range(1, len(symbol))
                   if symbol[:i] in vocab and symbol[i:] in vocab}
    if merged_ranks != sorted(merged_ranks) or set(merges) != every_split:
        return None
    return split_pattern, {_to_bytes(symbol): rank for symbol, rank in vocab.items()}


def _hf_encode(hf: tokenizers.Tokenizer, text: str) -> list[int]:
    """`hf`'s ids for `text`, nothing added around them."""
    try:
        return hf.encode(text, add_special_tokens=False).ids
    except TypeError:
        if not isinstance(text, str):
            raise
        # A str with surrogates cannot cross into Rust. tiktoken retries such text with lone
        # surrogates as U+FFFD and surrogate pairs joined into their character; so do we.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return hf.encode(text, add_special_tokens=False).ids


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
            "chat_template": CHAT_TEMPLATE,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    # ------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def chat_template(self) -> str:
        return CHAT_TEMPLATE

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
        return _hf_encode(self._hf, text)

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


# ----------------------------------------------------------------------------- imported tokenizers


def _byte_level_bytes(symbol: str) -> bytes:
    # HF's ByteLevel decoder passes a token with any character outside the byte table through as UTF-8.
    try:
        return _to_bytes(symbol)
    except KeyError:
        return symbol.encode("utf-8")


def _sentencepiece_bytes(symbol: str, byte_fallback: bool) -> bytes:
    byte = BYTE_FALLBACK_TOKEN.fullmatch(symbol) if byte_fallback else None
    if byte:
        return bytes([int(byte.group(1), 16)])
    return symbol.replace(SPIECE_SPACE, " ").encode("utf-8")


def _symbol_to_bytes(spec: dict, source: str) -> Callable[[str], bytes]:
    """How a vocabulary symbol becomes bytes, read off the tokenizer.json's decoder."""
    decoder = spec.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {step.get("type") for step in steps}
    if "ByteLevel" in kinds:  # GPT-2, Llama 3, Qwen
        return _byte_level_bytes
    replaces_mark = any(step.get("type") == "Replace" and step.get("pattern") == {"String": SPIECE_SPACE}
                        for step in steps)
    if kinds & {"Metaspace", "ByteFallback"} or replaces_mark:  # Llama 2, Mistral, TinyLlama, Gemma
        byte_fallback = "ByteFallback" in kinds
        return lambda symbol: _sentencepiece_bytes(symbol, byte_fallback)
    raise LmforgeError(
        f"{source}: decoder {decoder.get('type')!r} is neither byte-level (GPT-2, Llama 3, Qwen) nor "
        "SentencePiece-style (Llama 2, Mistral), so lmforge cannot tell which bytes each token stands for; "
        "use a model whose tokenizer is one of those"
    )


def _token_content(value: str | dict | None) -> str | None:
    """A tokenizer_config.json token: a string, or an AddedToken written as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """Any Hugging Face fast tokenizer (a `tokenizer.json`) behind `Tokenizer`'s interface.

    Build one with `load_tokenizer` or `HFTokenizer.load`. `config` is the parsed
    tokenizer_config.json: chat_template, bos/eos/pad/unk tokens, clean_up_tokenization_spaces.
    bos_id, eos_id and pad_id are None where the config names no such token (Qwen has no bos).
    """

    def __init__(self, tokenizer_json: str, config: dict | None = None, *, source: str = "tokenizer.json"):
        try:
            spec = json.loads(tokenizer_json)
            hf = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # json's ValueError, or the bare Exception the Rust side raises
            raise _unreadable(source, e) from None
        self._json = tokenizer_json  # save and export_hf write the file back unchanged
        self._config = dict(config or {})
        self.chat_template: str | None = self._config.get("chat_template")
        # Two encoders, because which strings count as special is a setting of the Rust object, not
        # an argument: `_hf` cuts special tokens out of the text, `_hf_plain` encodes them as text.
        self._hf = hf
        self._hf_plain = tokenizers.Tokenizer.from_str(tokenizer_json)
        self._hf_plain.encode_special_tokens = True
        for backend in (self._hf, self._hf_plain):
            # AutoTokenizer neither truncates nor pads unless asked to, whatever the file says.
            backend.no_truncation()
            backend.no_padding()

        added = {token["id"]: token for token in spec.get("added_tokens", [])}
        self.special_ids: dict[str, int] = {t["content"]: i for i, t in added.items() if t.get("special")}
        symbol_to_bytes = _symbol_to_bytes(spec, source)
        vocab = hf.get_vocab(with_added_tokens=True)
        # Indexed by id; None for an id no token has (a vocabulary with holes).
        self._token_bytes: list[bytes | None] = [None] * (max(vocab.values()) + 1)
        for symbol, i in vocab.items():
            self._token_bytes[i] = added[i]["content"].encode("utf-8") if i in added else symbol_to_bytes(symbol)
        specials = set(self.special_ids.values())
        self._token_byte_lengths = np.array(
            [0 if b is None or i in specials else len(b) for i, b in enumerate(self._token_bytes)], dtype=np.int64)

        self._special_tokens = {key: _token_content(self._config.get(key))
                                for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        for key, name in self._special_tokens.items():
            if name is not None and hf.token_to_id(name) is None:
                raise LmforgeError(f"{source}: tokenizer_config.json names {key} {name!r}, which is not in "
                                   "the vocabulary; correct the config or download the tokenizer again")

        self._enc = None  # the tiktoken fast path, for files where it gives HF's ids (Llama 3)
        layout = _tiktoken_layout(spec)
        if layout is not None:
            split_pattern, ranks = layout
            self._enc = tiktoken.Encoding("imported", pat_str=split_pattern, mergeable_ranks=ranks,
                                          special_tokens=self.special_ids)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        """Any `tokenizer.json` (the file or its folder), with the tokenizer_config.json beside it."""
        file = _tokenizer_file(path)
        return cls(_read_text(file), _read_tokenizer_config(file.parent), source=str(file))

    def save(self, path: str | os.PathLike) -> None:
        """Write the `tokenizer.json` exactly as it was read."""
        atomic_write_text(path, self._json)

    def export_hf(self, out_dir: str | os.PathLike, *, model_max_length: int | None = None) -> None:
        """Write `tokenizer.json` unchanged + a `tokenizer_config.json` for `transformers.AutoTokenizer`."""
        out_dir = Path(out_dir)
        self.save(out_dir / "tokenizer.json")
        # PreTrainedTokenizerFast runs tokenizer.json as written; a family class (LlamaTokenizer, ...)
        # would rebuild its pipeline from transformers' defaults (see the module docstring).
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({key: name for key, name in self._special_tokens.items() if name is not None})
        for key in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "model_max_length"):
            if key in self._config:
                config[key] = self._config[key]
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """1 + the largest id, so that arrays indexed by id fit (AutoTokenizer's len() skips holes)."""
        return len(self._token_bytes)

    def special_token_id(self, name: str) -> int:
        if name not in self.special_ids:
            known = ", ".join(list(self.special_ids)[:12]) + (", ..." if len(self.special_ids) > 12 else "")
            raise LmforgeError(f"unknown special token {name!r}; this tokenizer has: {known}")
        return self.special_ids[name]

    def _id_of(self, key: str) -> int | None:
        name = self._special_tokens[key]
        return None if name is None else self._hf.token_to_id(name)

    @property
    def bos_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._id_of("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._id_of("pad_token")

    def id_to_bytes(self, i: int) -> bytes:
        """The bytes token `i` adds to the text (see the module docstring); a special token gives its UTF-8."""
        return self.decode_bytes([i])

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: bytes per token, 0 for special tokens and unused ids."""
        return self._token_byte_lengths.copy()

    # ------------------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Ids for ordinary text; special-token strings inside it are encoded as plain text."""
        if self._enc is not None:
            return self._enc.encode_ordinary(text)
        return _hf_encode(self._hf_plain, text)

    def encode_with_special(self, text: str) -> list[int]:
        """Like `encode`, but each special-token string in `text` becomes its id (AutoTokenizer's default)."""
        if self._enc is not None:
            return self._enc.encode(text, allowed_special="all")
        return _hf_encode(self._hf, text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """`encode` for each text. On HF's path num_threads > 1 uses HF's own thread pool, whose size
        is all cores unless RAYON_NUM_THREADS says otherwise: it cannot be set per call."""
        if self._enc is not None:
            return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)
        if num_threads > 1:
            try:
                return [e.ids for e in self._hf_plain.encode_batch(texts, add_special_tokens=False)]
            except TypeError:  # a text with surrogates: `encode` repairs them one text at a time
                pass
        return [self.encode(text) for text in texts]

    def encode_hf(self, text: str) -> list[int]:
        """HF's path, whichever `encode` takes (for parity tests and debugging)."""
        return _hf_encode(self._hf_plain, text)

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self._token_bytes) or self._token_bytes[i] is None]
        if bad:
            raise LmforgeError(
                f"token ids {bad[:5]} are not in this tokenizer's vocabulary (ids 0..{len(self._token_bytes) - 1}); "
                "check that the model and tokenizer belong together"
            )
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The tokens' bytes joined: what streaming emits (a SentencePiece text keeps its leading space)."""
        return b"".join(self._token_bytes[i] for i in self._checked(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids` as AutoTokenizer's `decode` gives it (special tokens kept, HF's decoder applied).

        transformers v5 skips clean_up_tokenization_spaces for BPE models, so neither do we apply it.
        """
        return self._hf.decode(self._checked(ids), skip_special_tokens=False)


def _unreadable(file: str | os.PathLike, error: Exception) -> LmforgeError:
    return LmforgeError(f"{file}: not a readable tokenizer.json ({error}); download it again, "
                        "or write it with transformers' `save_pretrained`")


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable(file, e) from None


def _tokenizer_file(path: str | os.PathLike) -> Path:
    """The tokenizer.json that `path` (the file or its folder) names; a clear error where there is none."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    folder = file.parent
    if file.suffix == ".model" or (not file.is_file() and (folder / "tokenizer.model").is_file()):
        raise LmforgeError(
            f"{folder}: has tokenizer.model (a SentencePiece or tiktoken file) but no tokenizer.json, the "
            "only format lmforge reads; convert it with transformers: python -c \"from transformers import "
            f"AutoTokenizer; AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}')\""
        )
    if not file.is_file():
        raise LmforgeError(f"{file}: no tokenizer file here; give a model folder that has a tokenizer.json, "
                           "or train one with `lmforge tokenizer train`")
    return file


def _read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json in `folder` ({} if absent), completed as transformers completes it.

    bos/eos/pad/unk it lacks come from special_tokens_map.json (older folders); chat_template.jinja
    (newer folders) takes precedence over a chat_template in the config. Of a list of named
    templates (tool-use models), the one named "default" is the chat template.
    """
    config: dict = {}
    special_tokens: dict = {}
    for name, into in (("tokenizer_config.json", config), ("special_tokens_map.json", special_tokens)):
        if (folder / name).is_file():
            try:
                into.update(json.loads((folder / name).read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise LmforgeError(f"{folder / name}: not readable JSON ({e}); correct or re-download it") from None
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if key not in config and key in special_tokens:
            config[key] = special_tokens[key]
    if (folder / "chat_template.jinja").is_file():
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(config.get("chat_template"), list):
        config["chat_template"] = next((t["template"] for t in config["chat_template"] if t.get("name") == "default"),
                                       None)
    return config


def _is_lmforge_layout(spec: dict) -> bool:
    """Whether a tokenizer.json claims lmforge's layout: SPECIAL_TOKENS in order right after the vocabulary."""
    num_mergeable = len((spec.get("model") or {}).get("vocab") or {})
    added = [(token.get("content"), token.get("id")) for token in spec.get("added_tokens", [])]
    return added == [(name, num_mergeable + i) for i, name in enumerate(SPECIAL_TOKENS)]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer in `path`, a folder or its tokenizer.json.

    A `Tokenizer` for a file in lmforge's layout (trained by lmforge), else an `HFTokenizer` with the
    tokenizer_config.json beside the file (chat template, bos/eos/pad).
    """
    file = _tokenizer_file(path)
    text = _read_text(file)
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise _unreadable(file, e) from None
    if _is_lmforge_layout(spec):
        return Tokenizer.load(file)
    return HFTokenizer(text, _read_tokenizer_config(file.parent), source=str(file))


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


def render_tokens(tok: Tokenizer | HFTokenizer, text: str, *, color: bool = True, with_special: bool = False) -> str:
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
