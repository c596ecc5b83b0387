"""Tokenizer invariants: lossless round trip, HF == tiktoken ids, special-token layout, file handling.

One small tokenizer (vocab 512) is trained per module on ~1.5 MB of this interpreter's stdlib plus
multilingual text and numbers, so its merges are not all ASCII letters.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.common import LmforgeError
from lmforge.tokenizer import (
    GPT4_SPLIT_PATTERN,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    TOKEN_SEPARATOR,
    Tokenizer,
    render_tokens,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_BYTES = 1_500_000
VOCAB_SIZE = 512

MULTILINGUAL = """\
Le cœur a ses raisons que la raison ne connaît point. Où est la gare ? Ça dépend, déjà fermé.
Über den Wolken muss die Freiheit wohl grenzenlos sein. Größe, Straße, schön, müde.
Ο καιρός είναι ωραίος σήμερα και πηγαίνουμε στη θάλασσα.
Москва — столица России; сегодня хорошая погода, и мы идём гулять.
今天天气很好，我们去公园散步吧。机器学习和语言模型。
日本語のテキストも少し入れておきます。ひらがなとカタカナ。
한국어 문장도 하나 있습니다. 안녕하세요!
مرحبا بالعالم، هذه جملة عربية قصيرة.
नमस्ते दुनिया, यह एक छोटा वाक्य है।
Le 14 juillet 1789 ; π ≈ 3.14159 ; 1,000,000 € ; 2024-06-30T12:45:00Z.
Emoji: 🙂🚀👍🏽 👨‍👩‍👧 and combining: e\u0301 a\u0308 n\u0303.
"""
# Numbers in training give digit merges, so that a digit-grouping mismatch would change ids.
NUMBERS = "\n".join(f"{n} {n * n} {n / 7:.4f} 0x{n:04x}" for n in range(2000))

# Fragments aimed at the split pattern's edges: contractions, digit runs longer than a group, CRLF,
# indentation, Unicode spaces (NBSP, em space, ideographic space, NEL), combining marks, ZWJ emoji,
# control characters and the special-token syntax. Mixed with arbitrary characters.
FRAGMENTS = [
    *"ab Z'.,;:!?-_()[]{}<>|/\\\"#@é中🙂\t\n\r\x00\x1b",
    "'s", "'LL", "'ve", "123", "2024", "1234567", "1000000", "３４５", "Ⅻ", "\r\n", "    ", "  \n\n",
    " \u00a0", "\u2003", "\u3000", "\u0085", "e\u0301", "👨\u200d👩", "<|bos|>", " def", "x = 10**9",
]
# Any character UTF-8 can carry; the parity test also gets surrogates, which str can hold.
tricky_text = st.text() | st.lists(st.sampled_from(FRAGMENTS) | st.characters(codec="utf-8"), max_size=60).map(
    "".join
)
tricky_text_or_surrogates = tricky_text | st.lists(st.sampled_from(FRAGMENTS) | st.characters()).map("".join)


def stdlib_sources() -> list[Path]:
    return sorted(p for p in STDLIB.rglob("*.py") if "site-packages" not in p.parts)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts, num_bytes = [MULTILINGUAL] * 20 + [NUMBERS], 0
    for path in stdlib_sources():
        if num_bytes >= TRAIN_BYTES:
            break
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        num_bytes += len(texts[-1].encode())
    return Tokenizer.train(texts, VOCAB_SIZE)


def parity_sources() -> list[str]:
    names = ["typing.py", "inspect.py", "argparse.py", "json/decoder.py"]
    return [(STDLIB / name).read_text(encoding="utf-8") for name in names]


# ----------------------------------------------------------------------------- invariants

hypothesis_settings = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@hypothesis_settings
@given(text=tricky_text)
def test_round_trip_is_lossless(tok, text):
    assert tok.decode(tok.encode(text)) == text


@hypothesis_settings
@given(text=tricky_text_or_surrogates)
def test_hf_and_tiktoken_give_identical_ids(tok, text):
    assert tok.encode_hf(text) == tok.encode(text)


def test_surrogates_are_cleaned_like_tiktoken_does(tok):
    # Outside the round-trip promise (UTF-8 cannot carry them), but both paths must still agree.
    assert tok.encode("a\ud800b") == tok.encode_hf("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.encode("\ud83d\ude00") == tok.encode_hf("\ud83d\ude00") == tok.encode("😀")


def test_hf_and_tiktoken_agree_on_real_source(tok):
    for source in [*parity_sources(), MULTILINGUAL]:
        ids = tok.encode(source)
        assert tok.encode_hf(source) == ids
        assert tok.decode(ids) == source
        assert len(ids) < len(source.encode())  # merges were learned and used


@pytest.fixture(scope="module")
def gpt4_split(tok) -> tiktoken.Encoding:
    """tok's ranks under GPT-4's pattern exactly as OpenAI wrote it."""
    ranks = {tok.id_to_bytes(i): i for i in range(tok.bos_id)}
    return tiktoken.Encoding("gpt4", pat_str=GPT4_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})


@hypothesis_settings
@given(text=tricky_text)
def test_fast_split_pattern_equals_gpt4s(tok, gpt4_split, text):
    assert SPLIT_PATTERN != GPT4_SPLIT_PATTERN  # the rewrite for speed is what is under test
    assert tok.encode(text) == gpt4_split.encode_ordinary(text)


def test_fast_split_pattern_equals_gpt4s_on_real_source(tok, gpt4_split):
    for source in [*parity_sources(), MULTILINGUAL, NUMBERS]:
        assert tok.encode(source) == gpt4_split.encode_ordinary(source)


def test_vocabulary_layout(tok):
    num_mergeable = VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert tok.vocab_size == VOCAB_SIZE
    # Every byte is a token, so no text can fail to encode.
    assert {tok.id_to_bytes(i) for i in range(256)} == {bytes([b]) for b in range(256)}
    assert tok.special_ids == {s: num_mergeable + n for n, s in enumerate(SPECIAL_TOKENS)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (num_mergeable, num_mergeable + 1, num_mergeable + 2)
    assert tok.special_token_id("<|user_end|>") == num_mergeable + SPECIAL_TOKENS.index("<|user_end|>")
    assert tok.id_to_bytes(tok.bos_id) == b"<|bos|>"
    with pytest.raises(LmforgeError, match="<|nope|>"):
        tok.special_token_id("<|nope|>")


def test_special_token_text_is_plain_text_unless_asked(tok):
    text = "<|user_start|>hi<|user_end|><|assistant_start|>"
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special_ids.values())
    assert tok.encode_hf(text) == plain
    assert tok.decode(plain) == text

    chat = tok.encode_with_special(text)
    ids = tok.special_ids
    assert chat == [ids["<|user_start|>"], *tok.encode("hi"), ids["<|user_end|>"], ids["<|assistant_start|>"]]
    assert tok.decode(chat) == text


def test_token_byte_lengths_count_bytes_and_zero_for_specials(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    assert (lengths[: tok.bos_id] >= 1).all()
    assert (lengths[tok.bos_id :] == 0).all()
    for text in [MULTILINGUAL, parity_sources()[0]]:
        assert lengths[tok.encode(text)].sum() == len(text.encode())
    chat = tok.encode_with_special("<|bos|>héllo<|eos|>")
    assert lengths[chat].sum() == len("héllo".encode())


def test_decode_of_a_cut_character_gives_replacement_char(tok):
    byte_ids = {tok.id_to_bytes(i): i for i in range(256)}
    euro = "€".encode()  # 3 bytes
    assert tok.decode([byte_ids[b"a"], byte_ids[euro[:1]]]) == "a\ufffd"
    assert tok.decode_bytes([byte_ids[b] for b in (euro[:1], euro[1:2], euro[2:])]) == euro
    with pytest.raises(LmforgeError, match=str(tok.vocab_size)):
        tok.decode([tok.vocab_size])


def test_encode_batch_matches_encode(tok):
    texts = [*parity_sources(), MULTILINGUAL, ""]
    expected = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(texts, num_threads=4) == expected


# ----------------------------------------------------------------------------- training inputs

def test_vocab_size_too_small_is_refused():
    with pytest.raises(LmforgeError, match="vocab_size=269"):
        Tokenizer.train(["some text"], 256 + len(SPECIAL_TOKENS))


def test_empty_input_is_refused():
    for texts in ([], ["", ""], "one string, not a list"):
        with pytest.raises(LmforgeError):
            Tokenizer.train(texts, 300)


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    tok.save(path)
    spec = json.loads(path.read_text())
    assert [(t["content"], t["id"], t["special"]) for t in spec["added_tokens"]] == [
        (s, tok.special_ids[s], True) for s in SPECIAL_TOKENS
    ]
    sample = parity_sources()[1] + MULTILINGUAL + "<|bos|>"
    for source in (path, path.parent):  # the file, or the folder that holds it
        loaded = Tokenizer.load(source)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.special_ids == tok.special_ids
        assert loaded.encode(sample) == tok.encode(sample)
        assert loaded.encode_hf(sample) == tok.encode(sample)
        assert loaded.encode_with_special(sample) == tok.encode_with_special(sample)


def test_missing_or_corrupt_file_is_a_clear_error(tok, tmp_path):
    with pytest.raises(LmforgeError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "absent.json")
    corrupt = tmp_path / "corrupt.json"
    tok.save(corrupt)
    corrupt.write_text(corrupt.read_text()[:1000])  # a truncated write
    with pytest.raises(LmforgeError, match="corrupt.json"):
        Tokenizer.load(corrupt)
    # Valid tokenizer.json files that are not lmforge's: specials renumbered; a prefix space that
    # HF would add and tiktoken would not.
    spec = json.loads(tok._hf.to_str())
    renumbered = {**spec, "added_tokens": spec["added_tokens"][1:]}
    prefixed = json.loads(json.dumps(spec))
    prefixed["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    cases = [("renumbered", renumbered, "layout"), ("prefixed", prefixed, "pre-tokenizer")]
    for name, foreign, complaint in cases:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(foreign))
        with pytest.raises(LmforgeError, match=complaint):
            Tokenizer.load(path)


def test_export_hf_matches_autotokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.export_hf(tmp_path, model_max_length=2048)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.model_max_length == 2048
    for text in [parity_sources()[3], MULTILINGUAL, "<|user_start|>hi 123456<|user_end|>"]:
        # AutoTokenizer recognises special-token strings, like encode_with_special.
        ids = tok.encode_with_special(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == text


# ----------------------------------------------------------------------------- playground view

def split_view(rendered: str) -> tuple[str, str, str]:
    view, ids_line, summary = rendered.rsplit("\n", 2)
    return view, ids_line, summary


def test_render_without_color_joins_back_to_the_text(tok):
    text = "def f(x):\n\treturn x + 12345  # done\n\n"
    ids = tok.encode(text)
    view, ids_line, summary = split_view(render_tokens(tok, text, color=False))
    segments = view.split(TOKEN_SEPARATOR)
    assert len(segments) == len(ids)
    assert "".join(segments).replace("↵\n", "\n") == text
    assert "\x1b" not in view
    assert ids_line == f"ids: {ids}"
    assert summary.startswith(f"{len(text)} characters, {len(text.encode())} bytes, {len(ids)} tokens")


def test_render_shows_every_id_and_survives_cut_characters(tok):
    text = "🦀 crab\r\x1b[31m 你好"  # the crab is rare: its 4 bytes are cut across tokens
    ids = tok.encode(text)
    rendered = render_tokens(tok, text)
    view, ids_line, _ = split_view(rendered)
    assert ids_line == f"ids: {ids}"
    assert view.count("\x1b[0m") == len(ids)  # one coloured span per token (no newlines here)
    # The text's own ESC and CR are shown, not obeyed; the ESCs left are our colour codes.
    assert "␛" in view and "␍" in view and "\r" not in view
    plain_view, _, _ = split_view(render_tokens(tok, text, color=False))
    assert len(plain_view.split(TOKEN_SEPARATOR)) == len(ids)
    assert "\\xf0" in plain_view
