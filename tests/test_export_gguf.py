"""GGUF export: read every file back with gguf's own reader and check names, shapes, types, values
and metadata; the q/k permutation against an independent GGML-style (adjacent pairs) rotary; and,
where a llama.cpp-family runtime is installed (ik-llama-cpp-python, a prebuilt ik_llama.cpp), the
runtime's tokens and logits against lmforge's tokenizer and model (llama, qwen2, qwen3) and its
tokens against HF `tokenizers` (Qwen-style and SentencePiece-style files).

GPT-2 is checked on the file only: ik_llama.cpp's GPT-2 graph normalizes the MLP input with an RMS
norm and no bias (it asserts on the missing rms epsilon), so it cannot serve as the reference there."""

import importlib.util
import json
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.checkpoint import save_model_folder
from lmforge.common import LmforgeError
from lmforge.export_gguf import LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN, export_gguf
from lmforge.model import ModelConfig, Transformer, apply_rotary, rotary_tables
from lmforge.tokenizer import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

T = gguf.GGMLQuantizationType
SAMPLES = [
    "def foo(x):\n    return x + 1234567  # héllo wörld 😀\n\n\n  end",
    "I've been 'told he's there, 'RE you sure?   3.14159 333333 <|bos|> ...!!!\r\n\tok",
    "кириллица 中文字符 ok?\n \n\n \t\t x",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace")[:4000] for p in sorted(stdlib.glob("*.py"))[:40]]


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm gains and biases away from 1/0, so a misplaced one shows up in the values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model.eval()


def read_gguf(path: Path) -> tuple[dict, dict]:
    """({key: value}, {tensor name: ReaderTensor})."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def values(t) -> torch.Tensor:
    """A GGUF tensor as float32, in numpy (rows, cols) order."""
    shape = tuple(int(n) for n in reversed(t.shape))
    data = torch.from_numpy(np.array(t.data))
    if t.tensor_type == T.BF16:
        data = data.view(torch.bfloat16)
    return data.reshape(shape).float()


def byte_level_tokenizer(texts, pattern: str | None, special: list[str], vocab_size: int = 360):
    """A small HF byte-level BPE: regex Split + ByteLevel (Qwen/Llama 3 style) or GPT-2's ByteLevel."""
    tok = tokenizers.Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def write_hf_folder(folder: Path, config: dict, state: dict, tok, tokenizer_config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    tok.save(str(folder / "tokenizer.json"))
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


# ----------------------------------------------------------------------------- lmforge llama folder

@pytest.fixture(scope="module")
def lmforge_export(tmp_path_factory, texts):
    tok = Tokenizer.train(texts, vocab_size=400)
    # 8 embedding rows past the tokenizer's last id: the GGUF vocabulary fills them.
    config = ModelConfig(vocab_size=tok.vocab_size + 8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, rope_theta=5000.0)
    model = randomize(Transformer(config), seed=0)
    folder = save_model_folder(tmp_path_factory.mktemp("lmforge") / "tiny", model, tok)
    return folder, model, tok, export_gguf(folder, folder.parent / "tiny.gguf")


def test_lmforge_llama_tensors_metadata_and_tokenizer(lmforge_export):
    folder, model, tok, path = lmforge_export
    fields, tensors = read_gguf(path)
    c = model.config
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32  # fp32 source, dtype="auto"
    expected = {"llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.dimension_count": 16, "llama.rope.freq_base": 5000.0, "llama.vocab_size": c.vocab_size}
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert "llama.attention.key_length" not in fields  # head_dim == hidden / heads: llama.cpp's default

    # Every tensor under its GGUF name; tied head: no output.weight (llama.cpp reuses token_embd).
    blocks = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in blocks}
    assert set(tensors) == names
    state = model.state_dict()
    source = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    hf = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    source.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for i in range(2) for g, h in hf.items()})
    for name, t in tensors.items():
        src = state[source[name]]
        assert t.tensor_type == T.F32
        assert tuple(int(n) for n in t.shape) == tuple(reversed(src.shape))  # GGUF lists dimensions innermost first
        if ".attn_q." not in name and ".attn_k." not in name:  # those are permuted (next test)
            assert torch.equal(values(t), src), name

    # Tokenizer: byte-level symbols, specials as control tokens at the end, padding rows unused.
    spec = json.loads((folder / "tokenizer.json").read_text())
    n = tok.vocab_size
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == c.vocab_size
    assert all(tokens[i] == s for s, i in spec["model"]["vocab"].items())
    assert tokens[n - len(SPECIAL_TOKENS):n] == list(SPECIAL_TOKENS)
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 8)]
    assert types == [1] * (n - len(SPECIAL_TOKENS)) + [3] * len(SPECIAL_TOKENS) + [5] * 8
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert fields["tokenizer.ggml.eot_token_id"] == tok.special_token_id("<|assistant_end|>")  # ends a chat turn
    assert fields["tokenizer.ggml.add_bos_token"] is True  # training documents start with <|bos|>


def test_llama_qk_permutation_turns_rotate_half_into_ggml_adjacent_pair_rotary(lmforge_export):
    """GGML's llama rotary (LLAMA_ROPE_TYPE_NORM) turns pairs (2i, 2i+1); HF/lmforge turn (i, i + Hd/2).
    On the exported rows, GGML's rotary must give lmforge's rotated q/k in the permuted order, and so
    the same attention scores."""
    _, model, _, path = lmforge_export
    _, tensors = read_gguf(path)
    c = model.config
    H, K, Hd, L = c.num_attention_heads, c.num_key_value_heads, c.head_dim, 7
    attn = model.model.layers[1].self_attn
    Wq, Wk = attn.q_proj.weight.detach(), attn.k_proj.weight.detach()
    Gq, Gk = values(tensors["blk.1.attn_q.weight"]), values(tensors["blk.1.attn_k.weight"])

    def order(heads):  # GGML row 2i + s of a head holds HF row i + s * Hd/2
        return [h * Hd + (r % 2) * (Hd // 2) + r // 2 for h in range(heads) for r in range(Hd)]

    assert torch.equal(Gq, Wq[order(H)]) and torch.equal(Gk, Wk[order(K)])

    def ggml_rotary(x):  # (L, heads, Hd), written from GGML's definition: theta_i = p * base^(-2i/Hd)
        angle = torch.arange(L)[:, None] * c.rope_theta ** (-torch.arange(0, Hd, 2) / Hd)  # (L, Hd/2)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    cos, sin = rotary_tables(Hd, L, c.rope_theta)
    x = torch.randn(L, c.hidden_size)
    with torch.no_grad():
        q_ref = apply_rotary((x @ Wq.T).view(1, L, H, Hd).transpose(1, 2), cos, sin)[0].transpose(0, 1)  # (L, H, Hd)
        k_ref = apply_rotary((x @ Wk.T).view(1, L, K, Hd).transpose(1, 2), cos, sin)[0].transpose(0, 1)
    q_gguf, k_gguf = ggml_rotary((x @ Gq.T).view(L, H, Hd)), ggml_rotary((x @ Gk.T).view(L, K, Hd))
    torch.testing.assert_close(q_gguf.reshape(L, -1), q_ref.reshape(L, -1)[:, order(H)])
    torch.testing.assert_close(k_gguf.reshape(L, -1), k_ref.reshape(L, -1)[:, order(K)])

    def scores(q, k):  # (H, L, L), query head h reads key/value head h // (H / K)
        return torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(H // K, dim=1))

    torch.testing.assert_close(scores(q_gguf, k_gguf), scores(q_ref, k_ref), atol=1e-5, rtol=1e-5)


def test_lmforge_split_regex_cuts_text_as_llama_cpp_llama3_regex(texts):
    """The pre-tokenizer name promises llama.cpp's LLAMA3 regex; it must cut like lmforge's."""
    import regex

    ours, llama3 = regex.compile(GPT4_SPLIT_PATTERN), regex.compile(LLAMA3_SPLIT_PATTERN)
    fast = regex.compile(SPLIT_PATTERN)
    for text in [*SAMPLES, *texts[:10], " \n\n \r\n  x\n\t \n", "don'T WE'LL 'S 1234567 a\u00a0b"]:
        assert ours.findall(text) == llama3.findall(text) == fast.findall(text)


def test_rope_scaling_llama3_tensor_and_linear_keys(tmp_path, texts):
    tok = Tokenizer.train(texts[:5], vocab_size=300)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    for scaling in (llama3, {"rope_type": "linear", "factor": 4.0}):
        config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256,
                             rope_theta=50000.0, rope_scaling=scaling)
        folder = save_model_folder(tmp_path / scaling["rope_type"], Transformer(config), tok)
        fields, tensors = read_gguf(export_gguf(folder, tmp_path / f"{scaling['rope_type']}.gguf"))
        if scaling is llama3:
            # llama.cpp divides each base frequency by rope_freqs[i]; that must be lmforge's llama3 frequency.
            factors = values(tensors["rope_freqs.weight"]).double()
            assert tensors["rope_freqs.weight"].tensor_type == T.F32 and factors.shape == (32,)
            base = 50000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
            cos, sin = rotary_tables(64, 2, 50000.0, scaling)  # angles at position 1 are the frequencies
            torch.testing.assert_close(base / factors, torch.atan2(sin[1], cos[1]).double(), rtol=1e-6, atol=0)
            assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the blend are reached
            assert "llama.rope.scaling.type" not in fields
        else:
            assert "rope_freqs.weight" not in tensors
            assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0


# ----------------------------------------------------------------------------- Hugging Face-style folders

@pytest.fixture(scope="module")
def qwen3_export(tmp_path_factory, texts):
    """Qwen3 in bf16 with a Hugging Face config.json (qk-norm and the untied head implied, head_dim
    apart from the width, rope in transformers 5's rope_parameters) and a Qwen-style tokenizer."""
    config = ModelConfig(model_type="qwen3", vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=96, max_position_embeddings=96,
                         rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, qk_norm=True)
    model = randomize(Transformer(config), seed=1).to(torch.bfloat16)
    tok = byte_level_tokenizer(texts, QWEN2_SPLIT_PATTERN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens(["<think>"])  # an added token that is not special: user-defined
    hf_config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 384, "hidden_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                 "intermediate_size": 96, "max_position_embeddings": 96, "rms_norm_eps": 1e-6,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "use_sliding_window": False,
                 "sliding_window": 4096}
    tok_config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                  "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"}
    folder = write_hf_folder(tmp_path_factory.mktemp("qwen3") / "qwen3", hf_config, model.state_dict(), tok, tok_config)
    return folder, model.float(), tok, export_gguf(folder, folder.parent / "qwen3.gguf")


def test_qwen3_bf16_keeps_precision_qk_norm_and_rotate_half_rows(qwen3_export):
    folder, model, tok, path = qwen3_export
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == "qwen3" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert (fields["qwen3.attention.key_length"], fields["qwen3.attention.value_length"]) == (32, 32)
    assert fields["qwen3.rope.dimension_count"] == 32 and fields["qwen3.rope.freq_base"] == 1e6
    assert fields["qwen3.attention.head_count_kv"] == 2 and fields["qwen3.context_length"] == 96
    assert "qwen3.attention.sliding_window" not in fields  # use_sliding_window=false
    state = model.state_dict()
    assert len(tensors) == len(state)  # every weight, the untied head included
    assert tensors["output.weight"].tensor_type == T.BF16  # untied head
    for i in range(2):
        for g, h in (("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")):
            t = tensors[f"blk.{i}.{g}.weight"]
            assert t.tensor_type == T.F32 and tuple(t.shape) == (32,)
            assert torch.equal(values(t), state[f"model.layers.{i}.{h}.weight"])
        for g, h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_output", "o_proj")):
            t = tensors[f"blk.{i}.{g}.weight"]
            assert t.tensor_type == T.BF16  # bit-exact copies: Qwen runs NEOX (rotate-half) rotary, no permutation
            assert torch.equal(values(t), state[f"model.layers.{i}.self_attn.{h}.weight"])
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    tokens, types, ids = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"], tok.get_vocab()
    assert len(tokens) == 384 and tokens[ids["<think>"]] == "<think>"
    assert types[ids["<think>"]] == 4 and types[ids["<|im_end|>"]] == 3 and types[ids["Ġ"]] == 1
    assert set(types[tok.get_vocab_size():]) == {5}
    assert fields["tokenizer.ggml.eos_token_id"] == ids["<|im_end|>"]
    assert fields["tokenizer.ggml.padding_token_id"] == ids["<|endoftext|>"]
    assert "tokenizer.ggml.bos_token_id" not in fields and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"].startswith("{% for m in messages %}")


@pytest.fixture(scope="module")
def qwen2_export(tmp_path_factory, texts):
    """Qwen2 in fp16 with lmforge's own config.json field names (qkv_bias explicit)."""
    config = ModelConfig(model_type="qwen2", vocab_size=360, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=1, intermediate_size=96, max_position_embeddings=64, qkv_bias=True,
                         tie_word_embeddings=True)
    model = randomize(Transformer(config), seed=2).half()
    tok = byte_level_tokenizer(texts, QWEN2_SPLIT_PATTERN, ["<|endoftext|>"])
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    folder = write_hf_folder(tmp_path_factory.mktemp("qwen2") / "qwen2", config.to_dict(), state, tok)
    return folder, model.float(), tok, export_gguf(folder, folder.parent / "qwen2.gguf", dtype="f32")


def test_qwen2_biases_f32_and_dtype_override(qwen2_export):
    _, model, _, path = qwen2_export
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == "qwen2" and fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    state = model.state_dict()
    for p in ("q", "k", "v"):
        bias, weight = tensors[f"blk.0.attn_{p}.bias"], tensors[f"blk.0.attn_{p}.weight"]
        assert bias.tensor_type == T.F32 and torch.equal(values(bias), state[f"model.layers.0.self_attn.{p}_proj.bias"])
        assert weight.tensor_type == T.F32  # fp16 source, dtype="f32"
        assert torch.equal(values(weight), state[f"model.layers.0.self_attn.{p}_proj.weight"])
    assert "blk.0.attn_output.bias" not in tensors and "output.weight" not in tensors


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory, texts):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_level_tokenizer(texts, None, ["<|endoftext|>"], vocab_size=330)
    eot = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=330, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=eot, eos_token_id=eot))
    randomize(model, seed=3)
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2"
    model.save_pretrained(folder)  # config.json + model.safetensors, as Hugging Face writes them
    tok.save(str(folder / "tokenizer.json"))
    return folder, model, tok, export_gguf(folder, folder.parent / "gpt2.gguf", dtype="f16")


def test_gpt2_conv1d_transposed_and_layernorm_metadata(gpt2_export):
    _, model, tok, path = gpt2_export
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == "gpt2" and fields["gpt2.context_length"] == 64
    assert fields["gpt2.feed_forward_length"] == 256  # n_inner unset: 4 x width
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    state = model.state_dict()
    for g, h in (("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"), ("ffn_up", "mlp.c_fc"),
                 ("ffn_down", "mlp.c_proj")):
        t = tensors[f"blk.1.{g}.weight"]
        assert t.tensor_type == T.F16  # Conv1D stores (in, out); llama.cpp wants (out, in)
        torch.testing.assert_close(values(t), state[f"transformer.h.1.{h}.weight"].T.half().float(), rtol=0, atol=0)
        assert torch.equal(values(tensors[f"blk.1.{g}.bias"]), state[f"transformer.h.1.{h}.bias"])
    assert tensors["position_embd.weight"].tensor_type == T.F32  # the converter keeps it F32
    assert torch.equal(values(tensors["position_embd.weight"]), state["transformer.wpe.weight"])
    assert torch.equal(values(tensors["output_norm.bias"]), state["transformer.ln_f.bias"])
    assert torch.equal(values(tensors["output.weight"]), values(tensors["token_embd.weight"]))  # tied, written out
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    eot = tok.token_to_id("<|endoftext|>")  # named in config.json only, as GPT-2's files do
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == eot


# ----------------------------------------------------------------------------- SentencePiece-style BPE

def sentencepiece_style_tokenizer() -> tokenizers.Tokenizer:
    """Llama 2's layout in miniature: <unk> <s> </s>, 256 byte tokens, "▁" pieces, byte_fallback."""
    pieces = ["▁", "t", "h", "e", "a", "x", "ea", "▁t", "he", "▁the", "▁a", "te"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({p: 259 + i for i, p in enumerate(pieces)})
    merges = [("e", "a"), ("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("t", "e")]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                          fuse_unk=True))
    tok.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("▁"),
                                                      tokenizers.normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")])
    return tok


@pytest.fixture(scope="module")
def spm_export(tmp_path_factory):
    config = ModelConfig(model_type="mistral", vocab_size=271, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                         sliding_window=16)
    model = randomize(Transformer(config), seed=4)
    tok = sentencepiece_style_tokenizer()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    folder = write_hf_folder(tmp_path_factory.mktemp("spm") / "spm", config.to_dict(), state, tok,
                             {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    return folder, model, tok, export_gguf(folder, folder.parent / "spm.gguf")


def test_sentencepiece_style_vocab_scores_and_types(spm_export):
    _, _, tok, path = spm_export
    fields, _ = read_gguf(path)
    assert fields["general.architecture"] == "llama" and fields["llama.attention.sliding_window"] == 16
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x41] == "<0x41>" and tokens[268] == "▁the"
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:271]) == {1}
    # llama.cpp's SentencePiece merger takes the best-scoring pair first: the file's merge order.
    ids = tok.get_vocab()
    assert [scores[ids[p]] for p in ("ea", "▁t", "he", "▁the", "▁a", "te")] == [0, -1, -2, -3, -4, -5]
    assert (fields["tokenizer.ggml.unknown_token_id"], fields["tokenizer.ggml.bos_token_id"],
            fields["tokenizer.ggml.eos_token_id"]) == (0, 1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is True
    assert "tokenizer.ggml.merges" not in fields


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_input_and_the_fix(lmforge_export, tmp_path):
    folder, _, _, _ = lmforge_export
    with pytest.raises(LmforgeError, match="dtype='q4'"):
        export_gguf(folder, tmp_path / "x.gguf", dtype="q4")
    with pytest.raises(LmforgeError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")

    def copy(name, edit_config=None, edit_tokenizer=None, drop=None):
        dst = tmp_path / name
        dst.mkdir()
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            (dst / f).write_bytes((folder / f).read_bytes())
        if edit_config:
            raw = json.loads((dst / "config.json").read_text())
            edit_config(raw)
            (dst / "config.json").write_text(json.dumps(raw))
        if edit_tokenizer:
            spec = json.loads((dst / "tokenizer.json").read_text())
            edit_tokenizer(spec)
            (dst / "tokenizer.json").write_text(json.dumps(spec))
        if drop:
            from safetensors.torch import load_file
            state = load_file(dst / "model.safetensors")
            save_file({k: v for k, v in state.items() if k != drop}, dst / "model.safetensors")
        return dst

    with pytest.raises(LmforgeError, match="model_type 'falcon' has no GGUF export"):
        export_gguf(copy("a", edit_config=lambda c: c.update(model_type="falcon")), tmp_path / "x.gguf")
    with pytest.raises(LmforgeError, match="model.layers.1.mlp.up_proj.weight is missing"):
        export_gguf(copy("b", drop="model.layers.1.mlp.up_proj.weight"), tmp_path / "x.gguf")
    with pytest.raises(LmforgeError, match="unexpected tensors"):  # a layer the config does not describe
        export_gguf(copy("c", edit_config=lambda c: c.update(num_hidden_layers=1)), tmp_path / "x.gguf")
    with pytest.raises(LmforgeError, match="a WordPiece tokenizer has no GGUF export"):
        export_gguf(copy("d", edit_tokenizer=lambda s: s["model"].update(type="WordPiece")), tmp_path / "x.gguf")
    pre = lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+|\s+")  # noqa: E731
    with pytest.raises(LmforgeError, match="matches no llama.cpp pre-tokenizer"):
        export_gguf(copy("e", edit_tokenizer=pre), tmp_path / "x.gguf")
    extra = lambda s: s["added_tokens"].append({"id": 5000, "content": "<|x|>", "special": True})  # noqa: E731
    with pytest.raises(LmforgeError, match="token id 5000 is outside the model's vocab_size=408"):
        export_gguf(copy("f", edit_tokenizer=extra), tmp_path / "x.gguf")
    bare = copy("g")  # a training checkpoint: the tokenizer lives in the run folder
    (bare / "tokenizer.json").unlink()
    with pytest.raises(LmforgeError, match="tokenizer.json: no such file"):
        export_gguf(bare, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))  # nothing half-written
    fields, _ = read_gguf(export_gguf(bare, tmp_path / "ok" / "x.gguf", tokenizer=folder / "tokenizer.json"))
    assert fields["tokenizer.ggml.tokens"] == read_gguf(lmforge_export[3])[0]["tokenizer.ggml.tokens"]
    taken = tmp_path / "taken" / "x.gguf"  # a file already there is someone's: replaced only when asked
    taken.parent.mkdir()
    taken.write_bytes(b"not ours")
    with pytest.raises(LmforgeError, match="is a file; pass --overwrite to replace it"):
        export_gguf(folder, taken)
    assert taken.read_bytes() == b"not ours"
    assert read_gguf(export_gguf(folder, taken, overwrite=True))[0]["general.name"] == "tiny"
    assert sorted(p.name for p in taken.parent.iterdir()) == ["x.gguf"]


# ----------------------------------------------------------------------------- a real runtime

# The runtime is ik_llama.cpp through ik-llama-cpp-python's ctypes layer: its wheels need glibc 2.27,
# where llama.cpp's own prebuilt wheels (llama-cpp-py-sync) need 2.38 and Debian 12 has 2.36.
def run_llama_cpp(path: Path, texts: list[str], ids: list[int] | None = None):
    """(ids of each text, ids of texts[0] with add_bos, logits (len(ids), V) or None) from ik_llama.cpp."""
    from ik_llama_cpp import _ctypes_api, _internals

    model = _internals.IkModel(str(path))
    try:
        tokens = [model.tokenize(t, add_bos=False, special=False) for t in texts]
        with_bos = model.tokenize(texts[0], add_bos=True, special=False)
        if ids is None:
            return tokens, with_bos, None
        ctx = _internals.IkContext(model, n_ctx=64, n_threads=2, flash_attn=False)
        batch = _internals.make_batch(ids, logits_last=False)
        for i in range(len(ids)):
            batch.logits[i] = 1
        assert ctx.decode(batch) == 0
        logits = np.stack([np.ctypeslib.as_array(ctx.get_logits(i), shape=(model.n_vocab,)).copy()
                           for i in range(len(ids))])
        _ctypes_api.llama_batch_free(batch)
        ctx.close()
    finally:
        model.close()
    return tokens, with_bos, logits


def assert_same_predictions(logits: np.ndarray, ref: np.ndarray) -> None:
    """Logits equal up to the runtime's f16 KV cache; greedy tokens equal wherever the top two differ."""
    np.testing.assert_allclose(logits, ref, atol=2e-2 * max(1.0, float(np.abs(ref).max())), rtol=0)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.any() and (logits.argmax(-1) == ref.argmax(-1))[clear].all()


runtime = pytest.mark.skipif(
    importlib.util.find_spec("ik_llama_cpp") is None,
    reason="no llama.cpp-family runtime (pip install ik-llama-cpp-python)")


@runtime
def test_llama_cpp_runs_lmforge_export_like_lmforge(lmforge_export):
    _, model, tok, path = lmforge_export
    ids = [tok.bos_id, *tok.encode(SAMPLES[0])][:40]
    tokens, with_bos, logits = run_llama_cpp(path, SAMPLES, ids)
    assert tokens == [tok.encode(s) for s in SAMPLES]  # "<|bos|>" in SAMPLES[1] stays plain text
    assert with_bos == [tok.bos_id, *tok.encode(SAMPLES[0])]
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0, :, :].numpy()
    assert_same_predictions(logits, ref)


@runtime
@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_llama_cpp_runs_qwen_exports_like_lmforge(family, request):
    _, model, tok, path = request.getfixturevalue(f"{family}_export")
    tokens, with_bos, _ = run_llama_cpp(path, SAMPLES)
    assert tokens == [tok.encode(s, add_special_tokens=False).ids for s in SAMPLES] and with_bos == tokens[0]
    ids = tokens[0][:40]
    _, _, logits = run_llama_cpp(path, SAMPLES[:1], ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    assert_same_predictions(logits, ref)


@runtime
def test_llama_cpp_tokenizes_sentencepiece_style_like_hf(spm_export):
    _, _, tok, path = spm_export
    texts = ["the a thé tea", " the", "hat\nthe", "xtea"]  # xtea: "ea" merges before "te"
    tokens, with_bos, _ = run_llama_cpp(path, texts)
    assert tokens == [tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert with_bos == [1, *tokens[0]]
