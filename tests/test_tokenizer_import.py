"""Imported tokenizers == transformers' AutoTokenizer, one tiny tokenizer per family.

Each family's tokenizer is trained here on a small mixed text (English, Python, accents, CJK, emoji,
tabs and newlines) and laid out the way that family's files are: GPT-2 (ByteLevel with GPT-2's
regex), Llama 3 (ranks converted by transformers' own TikTokenConverter, as Llama 3's file was),
Qwen2 (NFC, Qwen's regex, no bos, a non-special added token like Qwen3's <think>) and
SentencePiece-style BPE with byte fallback in both layouts such files come in: Llama 2's legacy
normalizer (Prepend + Replace) and the newer Metaspace pre-tokenizer. Each is saved with
`PreTrainedTokenizerFast.save_pretrained` and read back by AutoTokenizer, the reference.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from lmforge.common import LmforgeError
from lmforge.tokenizer import (
    BYTE_TO_UNICODE,
    CHAT_TEMPLATE,
    UNICODE_TO_BYTE,
    HFTokenizer,
    Tokenizer,
    _tiktoken_layout,
    load_tokenizer,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MIXED = """\
The quick brown fox jumps over the lazy dog. It's 2024; don't panic, we'll see.
Le cœur a ses raisons que la raison ne connaît point. Ça dépend, déjà fermé. Größe, Straße, schön.
今天天气很好，我们去公园散步吧。机器学习和语言模型。日本語のテキストも少し。한국어 문장도 있습니다.
Emoji: 🙂🚀👍🏽 👨‍👩‍👧 and numbers 3.14159, 1,000,000, 2024-06-30.
def fib(n: int) -> int:
\tif n < 2:
\t\treturn n
\treturn fib(n - 1) + fib(n - 2)  # recursion
    indented    spaces\r\nCRLF line\n\n
"""
TRAINING_TEXT = [MIXED] * 30 + [(STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py")]
# Mixed, NFC, and not starting with a space (SentencePiece's prefix space is checked apart).
SAMPLE = ("Héllo wörld!\tTabs\nand newlines\r\n  def f(x):\n\treturn x**2  # 🙂 日本語 한국어 👨‍👩‍👧 "
          "1234567 naïve café, it's fine.\n")
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# family: (tokenizer_class its hub folders name, special-token strings, byte-level?)
FAMILIES = {
    "gpt2": ("GPT2Tokenizer", ["<|endoftext|>"], True),
    "llama3": ("PreTrainedTokenizerFast", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], True),
    "qwen2": ("Qwen2Tokenizer", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], True),
    "sp_legacy": ("LlamaTokenizer", ["<unk>", "<s>", "</s>"], False),
    "sp_metaspace": ("LlamaTokenizerFast", ["<unk>", "<s>", "</s>"], False),
}


# ----------------------------------------------------------------------------- the families

def train_byte_level(pre_tokenizer, normalizer=None) -> RawTokenizer:
    hf = RawTokenizer(models.BPE())
    hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(TRAINING_TEXT, trainer)
    return hf


def regex_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def gpt2() -> PreTrainedTokenizerFast:
    hf = train_byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False))
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


class RanksConverter(TikTokenConverter):
    """transformers' tiktoken -> tokenizer.json conversion, fed ranks instead of a .tiktoken file."""

    def __init__(self, ranks: dict[bytes, int], **kwargs):
        super().__init__(**kwargs)
        self.ranks = ranks

    def load_tiktoken_bpe(self, tiktoken_url):
        return self.ranks


def llama3() -> PreTrainedTokenizerFast:
    trained = train_byte_level(regex_then_bytes(LLAMA3_PATTERN))
    ranks = {bytes(UNICODE_TO_BYTE[c] for c in symbol): rank for symbol, rank in trained.get_vocab().items()}
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]
    hf = RanksConverter(ranks, pattern=LLAMA3_PATTERN, extra_special_tokens=specials).converted()
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, hf.token_to_id(bos))]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=bos, eos_token="<|eot_id|>")


def qwen2() -> PreTrainedTokenizerFast:
    hf = train_byte_level(regex_then_bytes(QWEN2_PATTERN), normalizer=normalizers.NFC())
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in FAMILIES["qwen2"][1]])
    hf.add_tokens([AddedToken("<think>", special=False, normalized=False)])  # Qwen3's are not special
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def sentencepiece_bpe(legacy: bool) -> PreTrainedTokenizerFast:
    """Llama 2 / Mistral layout: <unk> <s> </s>, the 256 "<0xNN>" byte tokens, then pieces with "▁"."""
    trainer_hf = RawTokenizer(models.BPE())
    trainer_hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # A small alphabet, so that rare characters (emoji, most CJK) go through byte fallback.
    trainer = trainers.BpeTrainer(vocab_size=400, limit_alphabet=100, show_progress=False)
    trainer_hf.train_from_iterator(TRAINING_TEXT, trainer)
    trained = json.loads(trainer_hf.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    vocab = {t: i for i, t in enumerate([*specials, *(f"<0x{b:02X}>" for b in range(256)), *pieces])}
    merges = [tuple(m) for m in trained["merges"]]
    hf = RawTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if legacy:  # what Llama 2, Mistral 7B v0.1 and TinyLlama ship
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:  # recent conversions (Mistral 7B v0.3)
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


BUILDERS = {"gpt2": gpt2, "llama3": llama3, "qwen2": qwen2, "sp_legacy": lambda: sentencepiece_bpe(True),
            "sp_metaspace": lambda: sentencepiece_bpe(False)}


class Family:
    def __init__(self, name: str, folder: Path):
        self.name, self.folder = name, folder
        self.hub_class, self.specials, self.byte_level = FAMILIES[name]
        self.tok = load_tokenizer(folder)
        self.auto = AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    folder = tmp_path_factory.mktemp(request.param)
    wrapped = BUILDERS[request.param]()
    wrapped.chat_template = CHAT
    wrapped.save_pretrained(str(folder))
    return Family(request.param, folder)


def auto_ids(auto, text: str, *, specials_as_text: bool = True) -> list[int]:
    """AutoTokenizer's ids with nothing added; specials_as_text is `encode`'s reading of special strings."""
    return auto(text, add_special_tokens=False, split_special_tokens=specials_as_text)["input_ids"]


# ----------------------------------------------------------------------------- parity

FRAGMENTS = [
    *"ab Z'.,;:!?-_()[]{}<>|/\\\"#@é中🙂\t\n\r\x00",
    "'s", "'LL", "123", "1234567", "\r\n", "    ", "  \n\n", " \u00a0", "\u3000", "\u0085", "e\u0301",
    "👨\u200d👩", "日本語", " def", "▁", "<0x0A>", "<s>", "</s>", "<|endoftext|>", "<|im_end|>",
    "<|begin_of_text|>", "<think>",
]
any_text = st.text(st.characters(codec="utf-8")) | st.lists(
    st.sampled_from(FRAGMENTS) | st.characters(codec="utf-8"), max_size=40).map("".join)


def test_ids_match_autotokenizer(family):
    tok, auto = family.tok, family.auto
    assert isinstance(tok, HFTokenizer)
    texts = [SAMPLE, MIXED, "", " leading space", "  \n\t ", "x" + "".join(family.specials) + " <think>y"]
    for text in texts:
        assert tok.encode(text) == auto_ids(auto, text), repr(text)
    assert tok.encode_batch(texts) == tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
    # Surrogates cannot reach Rust: repaired as tiktoken repairs them, on either path.
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.encode_batch(["\ud800"], num_threads=2) == [tok.encode("\ufffd")]
    assert len(tok.encode(MIXED)) < 0.4 * len(MIXED.encode())  # merges were learned and are used


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_ids_match_autotokenizer_on_any_text(family, text):
    assert family.tok.encode(text) == auto_ids(family.auto, text)


def test_tiktoken_path_only_for_llama3s_layout(family):
    # Llama 3's converted file is the one layout where tiktoken provably gives HF's ids, and the
    # tests above compare that path with AutoTokenizer; everyone else stays on HF's encoder.
    assert (family.tok._enc is not None) == (family.name == "llama3")
    assert family.tok.encode(MIXED) == family.tok.encode_hf(MIXED)


def test_encode_with_special_cuts_out_special_strings(family):
    tok, auto = family.tok, family.auto
    text = "a " + " b".join(family.specials) + " <think> c"
    ids = tok.encode_with_special(text)
    assert ids == auto_ids(auto, text, specials_as_text=False)
    assert all(tok.special_token_id(s) in ids for s in family.specials)
    assert not set(tok.encode(text)) & set(tok.special_ids.values())  # encode keeps them text


def test_decode_matches_autotokenizer(family):
    tok, auto = family.tok, family.auto
    for text in [SAMPLE, "a " + " b".join(family.specials) + " c"]:
        ids = auto_ids(auto, text, specials_as_text=False)
        assert tok.decode(ids) == auto.decode(ids)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    with pytest.raises(LmforgeError, match="not in this tokenizer's vocabulary"):
        tok.decode([tok.vocab_size])


def test_token_bytes_join_to_the_text(family):
    """What streaming generation relies on: the tokens' bytes, joined, are the text's UTF-8."""
    tok = family.tok
    ids = tok.encode(SAMPLE)
    joined = b"".join(tok.id_to_bytes(i) for i in ids)
    # SentencePiece prepends a space to the text; its decoder strips it again, the bytes keep it.
    expected = SAMPLE.encode() if family.byte_level else b" " + SAMPLE.encode()
    assert joined == tok.decode_bytes(ids) == expected
    assert joined.decode() == (tok.decode(ids) if family.byte_level else " " + tok.decode(ids))
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    assert sum(lengths[i] for i in ids) == len(expected)
    assert all(lengths[i] == 0 for i in tok.special_ids.values())
    if not family.byte_level:  # the emoji fall back to "<0xNN>" tokens, one byte each
        byte_tokens = [i for i in ids if family.auto.convert_ids_to_tokens(i).startswith("<0x")]
        assert len(byte_tokens) >= 4 and all(len(tok.id_to_bytes(i)) == 1 for i in byte_tokens)


def test_special_tokens_and_chat_template_come_from_the_config(family):
    tok, auto = family.tok, family.auto
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id)
    assert tok.eos_id is not None
    assert (tok.bos_id is None) == (family.name == "qwen2")  # Qwen has no bos
    assert tok.chat_template == auto.chat_template == CHAT
    assert tok.special_token_id(auto.eos_token) == tok.eos_id
    assert tok.id_to_bytes(tok.eos_id) == auto.eos_token.encode()
    with pytest.raises(LmforgeError, match="unknown special token"):
        tok.special_token_id("<|nope|>")


def test_export_hf_reloads_identically(family, tmp_path):
    tok, auto = family.tok, family.auto
    tok.export_hf(tmp_path, model_max_length=64)
    assert (tmp_path / "tokenizer.json").read_bytes() == (family.folder / "tokenizer.json").read_bytes()
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    special_text = "a " + " b".join(family.specials) + " c"
    for text in [SAMPLE, special_text]:
        assert auto_ids(again, text) == auto_ids(auto, text)
        assert auto_ids(again, text, specials_as_text=False) == auto_ids(auto, text, specials_as_text=False)
        assert again(text)["input_ids"] == auto(text)["input_ids"]  # bos added where the family adds it
    assert again.chat_template == auto.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.model_max_length == 64
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode(SAMPLE) == tok.encode(SAMPLE) and reloaded.chat_template == tok.chat_template


def test_hub_tokenizer_class_agrees(family, tmp_path):
    """Hub folders name a family class, which transformers v5 rebuilds from its own defaults.

    On text that does not start with a space they agree with the file. (Llama 2's legacy file, like
    SentencePiece, writes two "▁" before a text that starts with a space; v5's LlamaTokenizer one.)
    """
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (family.folder / name).exists():
            (tmp_path / name).write_bytes((family.folder / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": family.hub_class}))
    hub = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in [SAMPLE, MIXED]:
        assert family.tok.encode(text) == auto_ids(hub, text)


def test_tiktoken_path_refused_where_hf_merges_differ(tmp_path):
    """The trap in lmforge.tokenizer's docstring: "abc" listed only as "ab"+"c", "bc" ranked first.

    On "abcd" tiktoken reaches "a"+"bc" and merges it (its rule: the concatenation is a token); HF
    has no such merge. A file like this must stay on HF's encoder; listing every split fixes it.
    """
    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)} | {"bc": 256, "ab": 257, "abc": 258}
    hf = RawTokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges=True))
    hf.pre_tokenizer = regex_then_bytes(LLAMA3_PATTERN)
    hf.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=hf).save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    fast = tiktoken.Encoding("trap", pat_str=LLAMA3_PATTERN, special_tokens={},
                             mergeable_ranks={tok.id_to_bytes(i): i for i in range(259)})
    assert fast.encode_ordinary("abcd") == [258, ord("d")]  # the trap is real
    assert tok._enc is None
    assert tok.encode("abcd") == auto_ids(AutoTokenizer.from_pretrained(str(tmp_path)), "abcd") == [97, 256, 100]
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert _tiktoken_layout(spec) is None
    spec["model"]["merges"] = [["a", "b"], ["b", "c"], ["a", "bc"], ["ab", "c"]]  # every split, out of rank order
    assert _tiktoken_layout(spec) is None
    spec["model"]["merges"] = [["b", "c"], ["a", "b"], ["a", "bc"], ["ab", "c"]]  # every split, rank order
    assert _tiktoken_layout(spec) is not None


# ----------------------------------------------------------------------------- lmforge's own tokenizer

@pytest.fixture(scope="module")
def lmforge_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lmforge")
    Tokenizer.train(TRAINING_TEXT, 400).export_hf(folder)
    return folder


def test_load_tokenizer_returns_lmforges_tokenizer_for_its_files(lmforge_folder):
    for path in (lmforge_folder, lmforge_folder / "tokenizer.json"):
        assert type(load_tokenizer(path)) is Tokenizer


@pytest.fixture(scope="module")
def lmforge_both_ways(lmforge_folder) -> tuple[Tokenizer, HFTokenizer]:
    return Tokenizer.load(lmforge_folder), HFTokenizer.load(lmforge_folder)


@settings(max_examples=150, deadline=None)
@given(text=any_text)
def test_lmforge_file_read_as_any_hf_file_is_the_same_tokenizer(lmforge_both_ways, text):
    tok, imported = lmforge_both_ways
    assert imported._enc is not None  # lmforge's layout passes the tiktoken check
    assert imported.encode(text) == imported.encode_hf(text) == tok.encode(text)
    assert imported.encode_with_special(text) == tok.encode_with_special(text)


def test_lmforge_file_read_as_any_hf_file_has_the_same_vocabulary(lmforge_both_ways):
    tok, imported = lmforge_both_ways
    assert imported.vocab_size == tok.vocab_size and imported.special_ids == tok.special_ids
    every_id = range(tok.vocab_size)
    assert [imported.id_to_bytes(i) for i in every_id] == [tok.id_to_bytes(i) for i in every_id]
    assert (imported.token_byte_lengths() == tok.token_byte_lengths()).all()
    assert (imported.bos_id, imported.eos_id, imported.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert imported.chat_template == tok.chat_template == CHAT_TEMPLATE


def test_lmforge_chat_template_renders_in_transformers(lmforge_folder):
    tok, auto = Tokenizer.load(lmforge_folder), AutoTokenizer.from_pretrained(str(lmforge_folder))
    assert auto.chat_template == tok.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "tool", "content": "{}"},
                {"role": "user", "content": "Thanks!"}]
    rendered = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|bos|><|system_start|>Be brief.<|system_end|><|user_start|>2+2?<|user_end|>"
                        "<|assistant_start|>4<|assistant_end|><|tool_result_start|>{}<|tool_result_end|>"
                        "<|user_start|>Thanks!<|user_end|><|assistant_start|>")
    assert auto.apply_chat_template(messages, tokenize=False).endswith("<|user_end|>")
    ids = auto_ids(auto, rendered, specials_as_text=False)
    assert ids == tok.encode_with_special(rendered)
    assert ids[0] == tok.bos_id and ids[-1] == tok.special_token_id("<|assistant_start|>")
    with pytest.raises(Exception, match="not narrator"):
        auto.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


# ----------------------------------------------------------------------------- errors

def test_sentencepiece_model_without_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05hello")
    for path in (tmp_path, tmp_path / "tokenizer.model"):
        with pytest.raises(LmforgeError, match=r"tokenizer\.model.*no tokenizer\.json"):
            load_tokenizer(path)


def test_unreadable_or_unsupported_files_are_clear_errors(tmp_path, lmforge_folder):
    with pytest.raises(LmforgeError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    corrupt = tmp_path / "corrupt" / "tokenizer.json"
    corrupt.parent.mkdir()
    corrupt.write_text((lmforge_folder / "tokenizer.json").read_text()[:500])
    with pytest.raises(LmforgeError, match="corrupt/tokenizer.json: not a readable"):
        load_tokenizer(corrupt.parent)
    # WordPiece (BERT) decodes by gluing "##" pieces: no fixed bytes per token.
    wordpiece = RawTokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.save(str(tmp_path / "wordpiece.json"))
    with pytest.raises(LmforgeError, match="decoder 'WordPiece'"):
        load_tokenizer(tmp_path / "wordpiece.json")
    # A config naming a token the vocabulary lacks.
    folder = tmp_path / "bad_eos"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((lmforge_folder / "tokenizer.json").read_text())
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"] = spec["added_tokens"][:2]  # no longer lmforge's layout
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(LmforgeError, match="eos_token '</s>'"):
        load_tokenizer(folder)
