"""The sampler against its definitions, the KV-cached decode loop against a naive one, and streaming text."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmforge.common import LmforgeError
from lmforge.generate import TextStream, generate, sample_next, stream_text
from lmforge.model import ModelConfig, Transformer

CTX = 64


def tiny_model(num_key_value_heads: int = 2, seed: int = 0) -> Transformer:
    config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=num_key_value_heads, intermediate_size=64,
                         max_position_embeddings=CTX)
    model = Transformer(config)
    model.init_weights(seed)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def draws(logits_row: list[float], n: int = 4000, seed: int = 0, **kwargs) -> torch.Tensor:
    """n samples from one row of logits, drawn as one (n, V) batch."""
    logits = torch.tensor(logits_row).expand(n, -1)
    return sample_next(logits, generator=torch.Generator().manual_seed(seed), **kwargs)


# ----------------------------------------------------------------------------- sampler

def test_greedy_is_argmax_and_ignores_top_k_top_p():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    assert sample_next(logits, temperature=0, top_k=1, top_p=0.01).tolist() == [1, 0]
    assert sample_next(logits, temperature=0).dtype == torch.int64


def test_top_k_never_samples_outside_the_top_k():
    row = torch.randn(16, generator=torch.Generator().manual_seed(0)).tolist()
    top3 = set(torch.tensor(row).topk(3).indices.tolist())
    seen = set(draws(row, top_k=3).tolist())
    assert seen == top3  # none outside, and every one of the three is reachable


@pytest.mark.parametrize("probs, top_p, nucleus", [
    # Deliberately not sorted. At p=0.8 the nucleus is 0.5 + 0.3, which reach p exactly; p=0.81
    # needs the 0.15 too; p=0.3 only the top token.
    ([0.05, 0.3, 0.5, 0.15], 0.8, {2, 1}), ([0.05, 0.3, 0.5, 0.15], 0.81, {2, 1, 3}),
    ([0.05, 0.3, 0.5, 0.15], 0.3, {2}), ([0.05, 0.3, 0.5, 0.15], 1.0, {0, 1, 2, 3}),
    # 0.45 + 0.3 comes out of the fp32 softmax as 0.74999994: it still reaches p = 0.75.
    ([0.45, 0.3, 0.2, 0.05], 0.75, {0, 1}),
])
def test_top_p_keeps_exactly_the_nucleus(probs, top_p, nucleus):
    row = torch.tensor(probs).log().tolist()
    assert set(draws(row, top_p=top_p).tolist()) == nucleus


def test_top_k_then_top_p_combine():
    row = torch.tensor([0.05, 0.3, 0.5, 0.15]).log().tolist()
    # top-p on the full distribution: 0.5 + 0.3 = 0.8 falls short of 0.82, so 0.15 joins.
    assert set(draws(row, top_p=0.82).tolist()) == {1, 2, 3}
    # top-k 3 first leaves 0.5, 0.3, 0.15, renormalised to 0.526, 0.316, 0.158: now two reach 0.82.
    assert set(draws(row, top_k=3, top_p=0.82).tolist()) == {1, 2}
    assert set(draws(row, top_k=3, top_p=0.5).tolist()) == {2}  # 0.526 alone reaches 0.5


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    row = [1.0, 0.0, -1.0, 0.5]
    n = 20000
    counts = torch.bincount(draws(row, n=n, temperature=temperature), minlength=4).double()
    expected = n * torch.softmax(torch.tensor(row, dtype=torch.float64) / temperature, dim=0)
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 16.27  # the 0.1% critical value for 3 degrees of freedom


@pytest.mark.parametrize("kwargs, flag", [(dict(temperature=-0.1), "--temperature"),
                                          (dict(temperature=float("nan")), "--temperature"),
                                          (dict(top_k=0), "--top-k"),
                                          (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p")])
def test_bad_sampling_settings_name_the_flag(kwargs, flag):
    with pytest.raises(LmforgeError, match=flag):
        sample_next(torch.zeros(1, 4), **kwargs)
    with pytest.raises(LmforgeError, match=flag):  # generate checks at the call, before any token
        generate(tiny_model(), [1, 2], max_tokens=3, **kwargs)


# ----------------------------------------------------------------------------- decode loop

@torch.no_grad()
def naive_greedy(model: Transformer, prompt: list[int], max_tokens: int) -> list[int]:
    """The reference: recompute the whole sequence every step, no cache."""
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    return seq[len(prompt):]


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_greedy_generate_equals_full_recompute(kv_heads):
    model = tiny_model(kv_heads, seed=kv_heads)
    prompt = [3, 14, 15, 9, 26]
    assert list(generate(model, prompt, max_tokens=20, temperature=0)) == naive_greedy(model, prompt, 20)


def test_same_seed_same_tokens_and_different_seeds_differ(model):
    run = lambda seed: list(generate(model, [1, 2, 3], max_tokens=20, temperature=3.0, seed=seed))
    rng_before = torch.get_rng_state()
    assert run(7) == run(7)
    assert run(7) != run(8)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched


def test_stop_id_ends_generation_and_is_not_yielded(model):
    free = list(generate(model, [5, 6], max_tokens=20, seed=1))
    stop = free[5]
    first = free.index(stop)
    assert list(generate(model, [5, 6], max_tokens=20, seed=1, stop_ids={stop, 999})) == free[:first]


def test_max_tokens_is_respected(model):
    assert len(list(generate(model, [1], max_tokens=7, seed=0))) == 7
    assert list(generate(model, [1], max_tokens=0, seed=0)) == []


def test_full_context_ends_generation_without_error(model):
    prompt = list(range(CTX - 4))
    out = list(generate(model, prompt, max_tokens=50, temperature=0))
    assert len(out) == 4  # prompt + output == the context, where the model has no more positions
    assert out == naive_greedy(model, prompt, 4)


def test_prompt_that_is_empty_or_fills_the_context_raises(model):
    with pytest.raises(LmforgeError, match=f"{CTX} tokens.*context is {CTX}.*shorten the prompt"):
        generate(model, list(range(CTX)), max_tokens=5)
    with pytest.raises(LmforgeError, match="empty"):
        generate(model, [], max_tokens=5)
    with pytest.raises(LmforgeError, match="vocabulary"):
        generate(model, [1, 64], max_tokens=5)


def test_generate_does_not_leak_inference_mode_into_the_caller(model):
    tokens = generate(model, [1, 2], max_tokens=3, seed=0)
    next(tokens)  # suspended mid-stream
    assert not torch.is_inference_mode_enabled()
    assert not torch.is_autocast_enabled("cpu")


def test_bf16_autocast_decodes(model):
    # The cache must hold keys in the autocast dtype, or attention mixes bf16 and fp32 and fails.
    out = list(generate(model, [1, 2, 3], max_tokens=5, seed=0, dtype=torch.bfloat16))
    assert len(out) == 5 and all(0 <= t < 64 for t in out)


def test_model_cast_to_bf16_decodes():
    # Without autocast the keys come out in the weights' dtype; an fp32 cache would break attention.
    model = tiny_model().to(torch.bfloat16)
    prompt = [1, 2, 3]
    out = list(generate(model, prompt, max_tokens=4, temperature=0))
    # Only the first token is compared exactly: the prefill is the same computation as the reference,
    # while later bf16 steps round differently from a full recompute and may flip a near tie.
    assert len(out) == 4 and out[0] == naive_greedy(model, prompt, 1)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_on_cuda_equals_cpu():
    model = tiny_model()
    prompt = [3, 1, 4, 1, 5]
    expected = list(generate(model, prompt, max_tokens=10, temperature=0))
    assert list(generate(model.cuda(), prompt, max_tokens=10, temperature=0)) == expected


# ----------------------------------------------------------------------------- text streaming

class ByteTokenizer:
    """One token per byte (id = byte value), plus multi-byte tokens that cut characters in two."""

    EXTRA = {256: b"ab\xe2", 257: b"\x82\xacc", 258: b"EN", 259: b"D!"}  # "\xe2\x82\xac" is the euro sign

    def id_to_bytes(self, i: int) -> bytes:
        return bytes([i]) if i < 256 else self.EXTRA[i]

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.id_to_bytes(i) for i in ids)


def pieces(ids: list[int], stop=()) -> list[str]:
    return list(stream_text(ByteTokenizer(), ids, stop))


def test_stream_never_splits_a_multibyte_character():
    assert pieces([256, 257]) == ["ab", "€c"]
    euro_bytes = list("€".encode())
    stream = TextStream(ByteTokenizer())
    assert [stream.push(i) for i in euro_bytes] == ["", "", "€"]
    assert "".join(pieces(list("naïve 日本 🙂".encode()))) == "naïve 日本 🙂"
    assert all("\ufffd" not in p for p in pieces(list("日本🙂".encode())))


def test_stop_string_cuts_output_and_stops_pulling_tokens():
    consumed = []

    def tokens():
        for i in b"hello END world":
            consumed.append(i)
            yield i

    assert "".join(stream_text(ByteTokenizer(), tokens(), ["END"])) == "hello "
    assert bytes(consumed) == b"hello END"  # nothing pulled from the generator after the stop


def test_stop_string_spanning_tokens():
    # "EN" and "D!" are single tokens: the stop string "ND" lies across their boundary.
    assert "".join(pieces([ord("x"), 258, 259, ord("y")], ["ND"])) == "xE"
    # The earliest stop string in the text wins, whichever is listed first.
    assert "".join(pieces(list(b"hello world"), ["world", "lo"])) == "hel"


def test_partial_stop_match_is_held_back_then_released():
    stream = TextStream(ByteTokenizer(), stop=["END"])
    assert [stream.push(i) for i in b"aEN"] == ["a", "", ""]  # "EN" could still become "END"
    assert stream.push(ord("t")) == "ENt"  # it did not
    assert stream.push(ord("E")) == ""
    assert stream.finish() == "E"  # end of generation: a partial match is just text
    assert not stream.stopped


def test_empty_stop_string_is_rejected():
    with pytest.raises(LmforgeError, match="--stop"):
        TextStream(ByteTokenizer(), stop=[""])


class ChunkTokenizer:
    """A vocabulary made of the given byte chunks: token i is chunks[i]."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    def id_to_bytes(self, i: int) -> bytes:
        return self.chunks[i]


@settings(max_examples=150, deadline=None)
@example(text="🙂éa", cuts=[6], stops=["é", "🙂éa"])  # the shorter stop completes first
@given(text=st.text(alphabet="abAB é€🙂", max_size=24), cuts=st.lists(st.integers(0, 80), max_size=12),
       stops=st.lists(st.text(alphabet="ab é€🙂", min_size=1, max_size=3), max_size=3))
def test_stream_equals_text_up_to_first_stop_for_any_tokenisation(text, cuts, stops):
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    out = list(stream_text(ChunkTokenizer(chunks), range(len(chunks)), stops))
    # Output ends before the stop string that completes first, however the text was tokenised.
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    assert "".join(out) == text[:min(hits)[1] if hits else len(text)]
    assert all(out) and all("\ufffd" not in p for p in out)


def test_stream_text_leaves_special_tokens_out_unless_asked():
    class WithSpecials(ByteTokenizer):
        special_ids = {"<|pad|>": 300}
        EXTRA = {**ByteTokenizer.EXTRA, 300: b"<|pad|>"}

    ids = [104, 300, 105]
    assert "".join(stream_text(WithSpecials(), ids)) == "hi"
    assert "".join(stream_text(WithSpecials(), ids, skip_special=False)) == "h<|pad|>i"
