"""A GGUF file's tokenizer as Hugging Face files: `tokenizer.json` + `tokenizer_config.json` whose ids are
llama.cpp's for the same text. The inverse of export_gguf.py's tokenizer mapping (read its docstring).

    gguf_tokenizer_files(gguf.GGUFReader(path)) -> {"tokenizer.json": {...}, "tokenizer_config.json": {...}}

The reference is llama.cpp's own tokenizer (src/llama-vocab.cpp, src/unicode.cpp), not the tokenizer.json the
file was converted from: where the two differ (Qwen's NFC normalizer, which llama.cpp does not apply; the "▁"
llama.cpp puts after every special token where a Metaspace tokenizer.json puts none), the rebuilt file
follows llama.cpp. Everything below was checked against llama.cpp's libllama (commit 0c1e570) and
ik_llama.cpp (ik-llama-cpp-python 0.1.5); where those two differ, it follows llama.cpp (see Contractions).

tokenizer.ggml.model "gpt2": byte-level BPE
- The merges are the file's, in its order (a merge listed twice keeps its first rank, as llama.cpp's
  `bpe_ranks.emplace` does). A merge whose parts or result are not tokens has no Hugging Face equivalent
  (llama.cpp would merge into a string it then drops byte by byte): refused, as is a duplicate token text
  (llama.cpp refuses the file itself).
- The split regex comes from `tokenizer.ggml.pre`: llama.cpp ignores any regex in the file and keeps one regex
  list per pre-tokenizer name (PRE_TOKENIZERS below holds those lists, spelt as llama.cpp spells them). Each
  regex of a list splits the pieces of the one before, as `unicode_regex_split` does; a name not in the table
  is an error naming it, never a guess. SmolLM2 says "smollm": single digits first, then GPT-2's regex.
- Contractions. llama.cpp's Llama 3 and Qwen2 matchers take (?i:'s|'t|...) case-insensitively for ASCII
  only ("'T" + "he", but "'ſ" is no "'s"), as the spelling `'[sS]|'[tT]|...` does in Oniguruma. (ik_llama.cpp
  takes them only where the letter after the apostrophe is lowercase, "'The" whole: the one place it parts
  from llama.cpp here.)
- Unicode versions. llama.cpp's category tables are Unicode 15.1; `tokenizers` matches \\p{L} and \\p{N}
  with Oniguruma's newer tables, where the letters and digits Unicode 16.0 and 17.0 added (Garay,
  Tulu-Tigalari, CJK extension J, ...) are letters and digits. To llama.cpp they are unassigned, which its
  regexes treat as punctuation. The regexes here subtract them from \\p{L} and \\p{N} (_NEWER_LETTERS,
  _NEWER_DIGITS).
- A byte with no token of its own (SmolLM2 has none for 0xF1, the lead byte of U+40000-U+7FFFF) stays a
  symbol in llama.cpp, blocking merges across it, and is dropped at the end; HF's BPE would drop it first
  and merge its neighbours. A last Split isolates such byte symbols, so nothing merges across them.
- `ignore_merges` (a pre-token that is a token is taken whole) is set for the pre-tokenizers llama.cpp sets
  it for (llama-bpe and its aliases); lmforge's own tokenizer encodes that way, so its export round-trips.
  `pre_tokenizer_name` gives export_gguf.py the name back, so an imported model exports again.

tokenizer.ggml.model "llama": SentencePiece-style
- llama.cpp's merger (llm_tokenizer_spm) joins, again and again, the adjacent pair whose concatenation is a
  token of highest score (ties: leftmost), over all tokens, control and byte tokens included. As HF BPE
  merges: every split of every token into two tokens, ordered by the token's score (highest first, then id).
  Distinct mergeable tokens with equal scores would be ordered by position in llama.cpp, by rank here: a
  warning counts them (files converted from a .model file have distinct scores; lmforge's exporter writes
  -merge rank).
- Spaces become "▁"; with `add_space_prefix` (default on) a "▁" goes before the text and before the text
  after every special token, as llama.cpp does per fragment: a Prepend normalizer, which HF also applies per
  piece between added tokens. Characters with no token fall back to the `<0xNN>` byte tokens.

Special tokens. Control and unknown tokens become special added tokens, user-defined ones non-special added
tokens; all are matched verbatim (normalized=False). llama.cpp also overrides some types by text at load
time (a "<|im_end|>" or "<|endoftext|>" left user-defined is made control, "<|channel|>" is made
user-defined): the same overrides are applied here (_load_time_types). Which mode is which:
    lmforge `encode(text)`             == llama_tokenize(text, add_special=False, parse_special=False)
    lmforge `encode_with_special(text)` == llama_tokenize(text, add_special=False, parse_special=True)
In both, user-defined tokens (Qwen3's "<think>") are cut out of the text; control tokens only in the second.
(One difference is argued, not tested: llama.cpp cuts out the longest special token first, HF the leftmost
longest match; they differ only for special tokens that overlap each other in the text, counted by a
warning.)

BOS/EOS. Whether llama.cpp adds them is add_bos_token/add_eos_token, else its default for the model and
pre-tokenizer (on for "llama" and llama-bpe); a TemplateProcessing post-processor adds them where it does
(AutoTokenizer's add_special_tokens=True is llama.cpp's add_special=True). The ids are the file's, else
llama.cpp's defaults: 1/2/0 for "llama", SentencePiece's own, named in the config like the file's; for "gpt2"
its default 11 is a placeholder, added where llama.cpp adds it (with a warning) but not named as bos/eos in
tokenizer_config.json, where lmforge would stop generating at it.

tokenizer_config.json carries the chat template (named templates as a list, "default" first), bos/eos/unk/pad
and add_bos_token/add_eos_token, and names PreTrainedTokenizerFast, which runs tokenizer.json as written.

Reference runtime: `LlamaCppVocab` tokenizes with the installed llama.cpp-family library (ik-llama-cpp-python,
a dev extra), loading the vocabulary only; tests and bench/gguf_tokenizer.py compare against it, and the bench
also against llama.cpp's own libllama where one is built.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf

from lmforge.base import LmforgeError

T = gguf.TokenType
K = gguf.Keys.Tokenizer
SPIECE_SPACE = "\u2581"  # SentencePiece's "▁"

# ----------------------------------------------------------------------------- pre-tokenizers

# Letters and digits that Oniguruma (tokenizers' regex engine) knows from Unicode 16.0/17.0 and llama.cpp's
# Unicode 15.1 tables do not: (first, last) code points. Found by comparing the two on every code point
# (bench/gguf_tokenizer.py --sweep); tests check each range against the runtime.
_NEWER_LETTERS = (
    (0x88F, 0x88F), (0xC5C, 0xC5C), (0xCDC, 0xCDC), (0x1C89, 0x1C8A), (0xA7CB, 0xA7CF), (0xA7D2, 0xA7D2),
    (0xA7D4, 0xA7D4), (0xA7DA, 0xA7DC), (0xA7F1, 0xA7F1), (0x105C0, 0x105F3), (0x10940, 0x10959),
    (0x10D4A, 0x10D65), (0x10D6F, 0x10D85), (0x10EC2, 0x10EC7), (0x11380, 0x11389), (0x1138B, 0x1138B),
    (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3),
    (0x11BC0, 0x11BE0), (0x11DB0, 0x11DDB), (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C),
    (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF3), (0x187F8, 0x187FF), (0x18CFF, 0x18CFF),
    (0x18D09, 0x18D1E), (0x18D80, 0x18DF2), (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x1E6C0, 0x1E6DE),
    (0x1E6E0, 0x1E6E2), (0x1E6E4, 0x1E6E5), (0x1E6E7, 0x1E6ED), (0x1E6F0, 0x1E6F4), (0x1E6FE, 0x1E6FF),
    (0x2B73A, 0x2B73F), (0x2CEA2, 0x2CEAD), (0x323B0, 0x33479),
)
_NEWER_DIGITS = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11DE0, 0x11DE9), (0x16130, 0x16139),
    (0x16D70, 0x16D79), (0x16FF4, 0x16FF6), (0x1CCF0, 0x1CCF9), (0x1E5F1, 0x1E5FA),
)


def _class_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)


def onig_regex(llama_regex: str) -> str:
    """llama.cpp's regex as Oniguruma must read it to match the same text: \\p{L} and \\p{N} without the
    newer letters and digits. A nested class is a union member inside a class and a class outside one,
    so the same replacement serves `\\p{L}+` and `[^\\r\\n\\p{L}\\p{N}]`."""
    return (llama_regex.replace(r"\p{L}", rf"[\p{{L}}&&[^{_class_ranges(_NEWER_LETTERS)}]]")
            .replace(r"\p{N}", rf"[\p{{N}}&&[^{_class_ranges(_NEWER_DIGITS)}]]"))


# The regex lists of src/llama-vocab.cpp (llm_tokenizer_bpe), in llama.cpp's own spelling.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _LLAMA3_TAIL
QWEN2_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _LLAMA3_TAIL


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp pre-tokenizes for one `tokenizer.ggml.pre` name (llama_vocab::impl::load)."""
    regexes: tuple[str, ...]  # applied in order, each to the pieces the one before cut
    ignore_merges: bool = False  # a pre-token that is itself a token is taken whole
    add_bos: bool = False  # llama.cpp's add_bos where the file has no add_bos_token
    bos_default: bool = True  # False: no default bos id (chatglm-bpe)


_LLAMA3 = PreTokenizer((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_GPT2 = PreTokenizer((GPT2_REGEX,))
_DIGITS_GPT2 = PreTokenizer((r"\p{N}", GPT2_REGEX))
_QWEN2 = PreTokenizer((QWEN2_REGEX,))
# Name -> pre-tokenizer, for the names whose regexes use only \p{L}, \p{N} and \s (which _NEWER_* makes exact).
# Names llama.cpp knows but this table does not (deepseek-*, falcon, bloom, chameleon, superbpe, kimi-k2, jina-*,
# ...) use \p{P}/\p{S}/\p{M}, non-ASCII ranges, special hooks or an added separator token, and "glm4" changed
# meaning between llama.cpp versions (ignore_merges): all refused.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3_REGEX,))),
    "chatglm-bpe": PreTokenizer((LLAMA3_REGEX,), bos_default=False),
    **dict.fromkeys(("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "mpt", "olmo", "jais", "trillion",
                     "granite-docling", "exaone4"), _GPT2),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
                    _DIGITS_GPT2),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez"), _QWEN2),
}


# ----------------------------------------------------------------------------- reading the file

def _field(reader: gguf.GGUFReader, key: str, kind: str, default=None):
    """The value of `key`, checked to be `kind` ("str", "int", "bool", "float", "[str]", "[int]", "[float]")."""
    field = reader.fields.get(key)
    if field is None:
        return default
    types = field.types
    is_array = bool(types) and types[0] == gguf.GGUFValueType.ARRAY
    if kind.startswith("[") != is_array:
        raise LmforgeError(f"GGUF key {key} is {'an array' if is_array else 'a single value'}, not {kind}; "
                           "the file is not one llama.cpp reads: re-convert it")
    sub = types[-1] if types else None
    want = {"str": (gguf.GGUFValueType.STRING,), "bool": (gguf.GGUFValueType.BOOL,),
            "float": (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64),
            "int": (gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT16,
                    gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT32,
                    gguf.GGUFValueType.INT64, gguf.GGUFValueType.UINT64)}[kind.strip("[]")]
    if sub not in want:
        raise LmforgeError(f"GGUF key {key} holds {getattr(sub, 'name', sub)}, not {kind}; re-convert the file")
    try:
        return field.contents()
    except UnicodeDecodeError as e:
        raise LmforgeError(f"GGUF key {key}: a string that is not UTF-8 ({e.reason} at byte {e.start}); "
                           "a tokenizer.json cannot hold it: re-convert the file") from None


@dataclass
class GgufVocab:
    """The tokenizer metadata of a GGUF file, with llama.cpp's load-time rules applied."""
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]  # gguf.TokenType, after llama.cpp's overrides by text
    scores: list[float]
    merges: list[tuple[str, str]]
    special_ids: dict[str, int]  # bos/eos/unk/pad -> id: the file's, or llama.cpp's SentencePiece defaults
    added_ids: dict[str, int]  # "bos"/"eos" -> the id llama.cpp adds around the text (add_special=True)
    add_space_prefix: bool
    chat_templates: dict[str, str]  # "default" and named templates
    name: str


# Texts llama.cpp makes control tokens at load time, whatever their type in the file (llama_vocab::impl::load):
# every end-of-generation text, and, where the file names no id for the role, the first text found for it.
# (llama.cpp's lists as of mid-2026; the tests check them against the runtime.)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>")
_ROLE_TEXTS = {
    K.EOT_ID: ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
               "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    K.EOM_ID: ("<|eom_id|>",),
    K.FIM_PRE_ID: ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                   "<|code_prefix|>", "<|prefix|>"),
    K.FIM_SUF_ID: ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                   "<|code_suffix|>", "<|suffix|>"),
    K.FIM_MID_ID: ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                   "<|code_middle|>", "<|middle|>"),
    K.FIM_PAD_ID: ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    K.FIM_REP_ID: ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    K.FIM_SEP_ID: ("<|file_sep|>",),
}
# gpt-oss's, which llama.cpp always renders: user-defined whatever the file says.
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")
_MATCHED = (T.CONTROL, T.USER_DEFINED, T.UNKNOWN)  # cut out of the text before tokenizing (cache_special_tokens)


def _load_time_types(reader: gguf.GGUFReader, tokens: list[str], types: list[int]) -> list[int]:
    types = list(types)
    ids = {t: i for i, t in enumerate(tokens)}
    promote = {ids[t] for t in _EOG_TEXTS if t in ids}
    for key, texts in _ROLE_TEXTS.items():
        if _field(reader, key, "int") is not None:
            continue
        found = [ids[t] for t in texts if t in ids]
        if len(found) == 1:
            promote.add(found[0])
        elif any(types[i] != T.CONTROL and i not in promote for i in found):
            # llama.cpp takes the first in its hash map's order, which only the C++ library knows.
            warnings.warn(f"GGUF vocabulary: {', '.join(repr(tokens[i]) for i in found)} could each be llama.cpp's "
                          f"{key.split('.')[-1]}; it makes one of them a control token, not knowable here, so their "
                          "types are kept as the file has them", stacklevel=3)
    for i in promote:
        types[i] = T.CONTROL
    for t in _ALWAYS_USER_DEFINED:
        if t in ids:
            types[ids[t]] = T.USER_DEFINED
    # o200k_harmony and solar-open: llama.cpp takes "<|end|>" off the end-of-generation list, and makes it user-defined.
    has_call = "<|call|>" in ids or "<|calls|>" in ids
    if "<|end|>" in ids and has_call and ("<|return|>" in ids or "<|flush|>" in ids):
        types[ids["<|end|>"]] = T.USER_DEFINED
    return types


def read_gguf_vocab(reader: gguf.GGUFReader) -> GgufVocab:
    """The tokenizer metadata as llama.cpp loads it; clear errors for what it cannot hold or this cannot rebuild."""
    model = _field(reader, K.MODEL, "str")
    if model is None:
        raise LmforgeError(f"GGUF file has no {K.MODEL}: it carries no tokenizer (llama.cpp cannot run it either)")
    if model not in ("gpt2", "llama"):
        raise LmforgeError(f"GGUF {K.MODEL} is {model!r}; lmforge rebuilds 'gpt2' (byte-level BPE) and 'llama' "
                           "(SentencePiece-style BPE) vocabularies, not this one")
    tokens = _field(reader, K.LIST, "[str]")
    if not tokens:
        raise LmforgeError(f"GGUF file has no {K.LIST} (or an empty one): the vocabulary is missing; re-convert it")
    n = len(tokens)
    # llama.cpp names an empty token "[EMPTY_<id>]"; a tokenizer.json cannot hold an empty one either.
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(tokens)) != n:
        seen: dict[str, int] = {}
        dup = next((i, seen[t]) for i, t in enumerate(tokens) if seen.setdefault(t, i) != i)
        raise LmforgeError(f"GGUF vocabulary: token {dup[0]} repeats token {dup[1]} ({tokens[dup[0]]!r}); llama.cpp "
                           "refuses such a file (one text, one id): re-convert it")
    types = _field(reader, K.TOKEN_TYPE, "[int]") or [T.NORMAL] * n
    scores = _field(reader, K.SCORES, "[float]") or [0.0] * n
    for key, values in ((K.TOKEN_TYPE, types), (K.SCORES, scores)):
        if len(values) != n:
            raise LmforgeError(f"GGUF {key} has {len(values)} entries for {n} tokens; re-convert the file")
    bad = next((i for i, s in enumerate(scores) if math.isnan(s)), None)
    if bad is not None:
        raise LmforgeError(f"GGUF {K.SCORES}: token {bad} ({tokens[bad]!r}) scores NaN, which orders no merge; "
                           "re-convert the file")
    pre = _field(reader, K.PRE, "str") or ""
    name = _field(reader, gguf.Keys.General.NAME, "str") or ""
    if model == "gpt2":
        if not pre:
            # llama.cpp falls back to its 'default' regexes, which use \p{P} (see PRE_TOKENIZERS).
            raise LmforgeError(f"GGUF file has no {K.PRE}: llama.cpp then uses its 'default' pre-tokenizer "
                               "(with a quality warning), which lmforge does not reproduce; re-convert the file with "
                               "a current convert_hf_to_gguf.py")
        if pre not in PRE_TOKENIZERS:
            raise LmforgeError(f"GGUF {K.PRE} is {pre!r}, a pre-tokenizer lmforge does not reproduce; supported: "
                               f"{', '.join(sorted(PRE_TOKENIZERS))}")
    if any(s in name.lower() for s in ("phi-3", "phi3", "modern-bert")):
        # llama.cpp strips the spaces beside special tokens of models it recognises by name (Phi-3, ModernBERT).
        raise LmforgeError(f"GGUF general.name {name!r}: llama.cpp strips spaces beside this model's special tokens, "
                           "chosen by its name, which lmforge does not reproduce")

    merges: list[tuple[str, str]] = []
    if model == "gpt2":
        raw = _field(reader, K.MERGES, "[str]")
        if raw is None:
            raise LmforgeError(f"GGUF file has no {K.MERGES}: a 'gpt2' vocabulary needs them (llama.cpp refuses the "
                               "file too); re-convert it")
        merges = _bpe_merges(raw, set(tokens))

    types = _load_time_types(reader, tokens, types)
    pre_spec = PRE_TOKENIZERS.get(pre)
    # llama.cpp's ids: the file's, else its defaults: 1/2/0 for "llama" (SentencePiece's own, named in the
    # config) and 11 for "gpt2", a placeholder it uses only where it adds bos/eos: named in tokenizer_config.json
    # it would become a stop token of lmforge's (generate stops at bos and eos).
    defaults = {"llama": {"bos": 1, "eos": 2, "unk": 0}, "gpt2": {"bos": 11, "eos": 11}}[model]
    if pre_spec is not None and not pre_spec.bos_default:
        defaults.pop("bos")
    special_ids, placeholders = {}, {}
    for kind, key in (("bos", K.BOS_ID), ("eos", K.EOS_ID), ("unk", K.UNK_ID), ("pad", K.PAD_ID)):
        value = _field(reader, key, "int")
        if value is not None and not 0 <= value < n:
            warnings.warn(f"GGUF {key} = {value} is outside the {n} tokens; llama.cpp ignores it, and so does lmforge",
                          stacklevel=2)
            value = None
        if value is not None:
            special_ids[kind] = value
        elif defaults.get(kind, n) < n:
            (special_ids if model == "llama" else placeholders)[kind] = defaults[kind]
    add_bos = _field(reader, K.ADD_BOS, "bool")
    if add_bos is None:
        add_bos = model == "llama" or (pre_spec is not None and pre_spec.add_bos)
    add_eos = bool(_field(reader, K.ADD_EOS, "bool"))
    added_ids = {}
    for flag, kind, key in ((add_bos, "bos", K.BOS_ID), (add_eos, "eos", K.EOS_ID)):
        if not flag:
            continue
        if kind not in special_ids and kind not in placeholders:
            raise LmforgeError(f"GGUF file asks llama.cpp to add a {kind.upper()} token but names none it can use; "
                               f"add {key} or turn the flag off")
        added_ids[kind] = special_ids.get(kind, placeholders.get(kind))
        if kind not in special_ids:
            warnings.warn(f"GGUF file has no {key} but asks for a {kind.upper()} token: llama.cpp adds its default id "
                          f"{added_ids[kind]} ({tokens[added_ids[kind]]!r}), and so does this tokenizer", stacklevel=2)
    add_space_prefix = _field(reader, K.ADD_PREFIX, "bool")
    if add_space_prefix is None:
        add_space_prefix = model == "llama"

    templates = {}
    default = _field(reader, K.CHAT_TEMPLATE, "str")
    if default is not None:
        templates["default"] = default
    for template_name in _field(reader, K.CHAT_TEMPLATES, "[str]") or []:
        value = _field(reader, K.CHAT_TEMPLATE_N.format(name=template_name), "str")
        if value is not None:
            templates[template_name] = value
    return GgufVocab(model, pre, tokens, types, [float(s) for s in scores], merges, special_ids, added_ids,
                     bool(add_space_prefix), templates, name)


def _bpe_merges(raw: list[str], vocab: set[str]) -> list[tuple[str, str]]:
    """The file's "a b" merges as pairs, split where llama.cpp splits them (the first space after the first
    character); a repeated merge keeps its first rank."""
    merges, seen, malformed = [], set(), 0
    for rank, merge in enumerate(raw):
        cut = merge.find(" ", 1)
        if cut < 0:  # llama.cpp ranks it as ("", ""), which never matches
            malformed += 1
            continue
        pair = (merge[:cut], merge[cut + 1:])
        if pair in seen:
            continue
        seen.add(pair)
        if pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            missing = next(p for p in (pair[0], pair[1], pair[0] + pair[1]) if p not in vocab)
            raise LmforgeError(f"GGUF {K.MERGES}[{rank}] {merge!r}: {missing!r} is not a token; llama.cpp would merge "
                               "into text it then drops, which a tokenizer.json cannot express: re-convert the file")
        merges.append(pair)
    if malformed:
        warnings.warn(f"GGUF {K.MERGES}: {malformed} entries without a space are no merges (llama.cpp never applies "
                      "them); dropped", stacklevel=3)
    return merges


# ----------------------------------------------------------------------------- building tokenizer.json

def _added_tokens(v: GgufVocab) -> list[dict]:
    return [{"id": i, "content": v.tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": v.types[i] != T.USER_DEFINED}
            for i in range(len(v.tokens)) if v.types[i] in _MATCHED]


def _overlapping_specials(texts: list[str]) -> int:
    """How many matched tokens end with the start of another (where longest-first and leftmost-first can
    differ; a token overlapping itself, "aa" in "aaa", is cut alike by both)."""
    owners: dict[str, int] = {}  # proper prefix -> how many tokens start with it
    for t in texts:
        for k in range(1, len(t)):
            owners[t[:k]] = owners.get(t[:k], 0) + 1
    return sum(any(owners.get(t[k:], 0) > t.startswith(t[k:]) for k in range(1, len(t))) for t in texts)


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_NEVER_IN_UTF8 = frozenset((0xC0, 0xC1, *range(0xF5, 0x100)))  # bytes no UTF-8 text contains
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
# The name export_gguf.py writes back for a rebuilt pre-tokenizer: names sharing regexes and ignore_merges
# tokenize alike (their other difference, a default add_bos, is written out in tokenizer_config.json).
_CANONICAL_NAMES = ("llama-bpe", "dbrx", "gpt-2", "smollm", "qwen2")


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer name of a tokenizer.json this module rebuilt, else None (export_gguf.py)."""
    steps = (tokenizer_json.get("pre_tokenizer") or {}).get("pretokenizers") or []
    if len(steps) >= 2 and steps[-2] == _BYTE_LEVEL and steps[-1].get("type") == "Split":
        steps = steps[:-1]  # the isolation of byte symbols without a token
    ignore_merges = bool((tokenizer_json.get("model") or {}).get("ignore_merges"))
    for name in _CANONICAL_NAMES:
        spec = PRE_TOKENIZERS[name]
        if spec.ignore_merges == ignore_merges and steps == [*(_split(onig_regex(r)) for r in spec.regexes),
                                                                _BYTE_LEVEL]:
            return name
    return None


def _byte_level_parts(v: GgufVocab) -> tuple[dict, dict]:
    from lmforge.tokenizer import BYTE_TO_UNICODE  # the GPT-2 byte table both sides use

    spec = PRE_TOKENIZERS[v.pre]
    vocab = set(v.tokens)
    # Byte symbols without a token: isolated after the byte-level mapping, so no merge crosses them (see above).
    # The step costs about a fifth of the encoding speed, so it is left out for bytes UTF-8 never holds.
    lone = [s for b, s in BYTE_TO_UNICODE.items() if s not in vocab and b not in _NEVER_IN_UTF8]
    steps = [_split(onig_regex(r)) for r in spec.regexes]
    steps.append(dict(_BYTE_LEVEL))
    if lone:
        steps.append(_split("[" + "".join(re.escape(s) for s in lone) + "]"))
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": spec.ignore_merges, "vocab": {t: i for i, t in enumerate(v.tokens)},
             "merges": [list(m) for m in v.merges]}
    pipeline = {"normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
                "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}}
    return pipeline, model


def _spm_merges(v: GgufVocab) -> list[list[str]]:
    """llama.cpp's score-ordered merger as a BPE merge list (see the module docstring)."""
    ids = {t: i for i, t in enumerate(v.tokens)}
    ranked = []  # (-score, id, split position, left, right)
    mergeable: dict[float, int] = {}  # score -> number of mergeable tokens with it
    for i, token in enumerate(v.tokens):
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        if splits:
            mergeable[v.scores[i]] = mergeable.get(v.scores[i], 0) + 1
            ranked.extend((-v.scores[i], i, k, left, right) for k, (left, right) in enumerate(splits))
    ties = sum(count for count in mergeable.values() if count > 1)
    if ties:
        warnings.warn(f"GGUF {K.SCORES}: {ties} mergeable tokens share their score with another; llama.cpp orders "
                      "such merges by position, this tokenizer by token id, so some texts may tokenize differently",
                      stacklevel=3)
    ranked.sort()
    return [[left, right] for _, _, _, left, right in ranked]


def _spm_parts(v: GgufVocab) -> tuple[dict, dict]:
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE}
    steps = ([{"type": "Prepend", "prepend": SPIECE_SPACE}] if v.add_space_prefix else []) + [replace]
    decoders = [{"type": "Replace", "pattern": {"String": SPIECE_SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if v.add_space_prefix:  # the space llama.cpp put before the text
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = v.special_ids.get("unk")
    model = {"type": "BPE", "dropout": None, "unk_token": None if unk is None else v.tokens[unk],
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
             "ignore_merges": False, "vocab": {t: i for i, t in enumerate(v.tokens)}, "merges": _spm_merges(v)}
    pipeline = {"normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None,
                "decoder": {"type": "Sequence", "decoders": decoders}}
    return pipeline, model


def _post_processor(v: GgufVocab) -> dict | None:
    """bos/eos around the text where llama.cpp adds them (AutoTokenizer's add_special_tokens=True)."""
    if not v.added_ids:
        return None
    names = {kind: v.tokens[i] for kind, i in v.added_ids.items()}

    def template(seq: str) -> list[dict]:
        bos = [{"SpecialToken": {"id": names["bos"], "type_id": 0}}] if "bos" in names else []
        eos = [{"SpecialToken": {"id": names["eos"], "type_id": 0}}] if "eos" in names else []
        return [*bos, {"Sequence": {"id": seq, "type_id": 0}}, *eos]

    return {"type": "TemplateProcessing", "single": template("A"), "pair": template("A") + template("B"),
            "special_tokens": {names[k]: {"id": names[k], "ids": [i], "tokens": [names[k]]}
                               for k, i in v.added_ids.items()}}


def tokenizer_files(v: GgufVocab) -> dict[str, dict]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} for a read vocabulary."""
    added = _added_tokens(v)
    overlaps = _overlapping_specials([t["content"] for t in added])
    if overlaps:
        warnings.warn(f"GGUF vocabulary: {overlaps} special tokens end with the start of another; where both match "
                      "overlapping text, llama.cpp (longest first) and this tokenizer (leftmost first) may differ",
                      stacklevel=2)
    pipeline, model = _byte_level_parts(v) if v.model == "gpt2" else _spm_parts(v)
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, **pipeline,
                 "post_processor": _post_processor(v), "model": model}
    # Key order as tokenizers writes it, so the file reads like any other.
    order = ("version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "post_processor",
             "decoder", "model")
    tokenizer = {k: tokenizer[k] for k in order}

    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": "bos" in v.added_ids,
                    "add_eos_token": "eos" in v.added_ids, "clean_up_tokenization_spaces": False}
    for kind in ("bos", "eos", "unk", "pad"):
        if kind in v.special_ids:
            config[f"{kind}_token"] = v.tokens[v.special_ids[kind]]
    if list(v.chat_templates) == ["default"]:
        config["chat_template"] = v.chat_templates["default"]
    elif v.chat_templates:
        config["chat_template"] = [{"name": k, "template": t} for k, t in v.chat_templates.items()]
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def gguf_tokenizer_files(reader: gguf.GGUFReader) -> dict[str, dict]:
    """The GGUF file's tokenizer as {"tokenizer.json": dict, "tokenizer_config.json": dict}, to be written as JSON.

    Ids equal llama.cpp's: `encode` (special-token text kept as text) matches llama_tokenize(..., parse_special=
    False), `encode_with_special` matches parse_special=True (module docstring). Raises LmforgeError for a
    vocabulary llama.cpp would refuse or that cannot be rebuilt exactly; warns (warnings.warn) where a rule of
    llama.cpp's cannot be known from the file, saying what may differ.
    """
    return tokenizer_files(read_gguf_vocab(reader))


# ----------------------------------------------------------------------------- the reference runtime

class LlamaCppVocab:
    """llama.cpp's own tokenizer for a GGUF file, its vocabulary only loaded (tests and benchmarks compare
    against it). Needs ik-llama-cpp-python (the dev extra); its C library logs to stderr while loading."""

    def __init__(self, path: str | Path):
        try:
            from ik_llama_cpp import _ctypes_api as api
        except ImportError as e:
            raise LmforgeError(f"no llama.cpp-family runtime ({e}); pip install ik-llama-cpp-python") from None
        self._api = api
        api.llama_backend_init()
        params = api.llama_model_default_params()
        params.vocab_only = True
        self._model = api.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise LmforgeError(f"{path}: llama.cpp cannot load this file's vocabulary (its log above says why)")

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """llama_tokenize: add_special adds bos/eos as the file says; parse_special cuts out control tokens."""
        data = text.encode("utf-8")
        n = -self._api.llama_tokenize(self._model, data, len(data), None, 0, add_special, parse_special)
        buffer = (self._api.llama_token * max(n, 1))()
        got = self._api.llama_tokenize(self._model, data, len(data), buffer, max(n, 1), add_special, parse_special)
        if got < 0:
            raise RuntimeError(f"llama_tokenize returned {got} for {len(data)} bytes")
        return list(buffer[:got])

    def close(self) -> None:
        if self._model:
            self._api.llama_free_model(self._model)
            self._model = None

    def __enter__(self) -> LlamaCppVocab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
