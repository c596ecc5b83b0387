"""Quantised GGUF export: every type's bytes decode (gguf's own dequantize) to exactly the values the
quantiser chose; plain rounding is GGML's reference byte for byte; the scale search never loses to
plain rounding on squared error; types per tensor follow llama-quantize; the importance vectors
are what they claim; the written file reads back; and a llama.cpp-family runtime (ik_llama.cpp)
runs each type close to the F32 export."""

import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from test_export_gguf import randomize, read_gguf, run_llama_cpp, runtime

from lmforge.checkpoint import save_model_folder
from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.export_gguf import export_gguf
from lmforge.gguf_quants import QUANTS, collect_importance, quantize, tensor_qtype
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

T = gguf.GGMLQuantizationType
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
REFERENCE = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # the types gguf.quants can quantise (GGML's reference)


def data(kind: str, rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(rows, cols, generator=g)
    # Student's t with 2 degrees of freedom: outliers in most blocks, as in LLM weight rows
    z, chi2 = torch.randn(rows, cols, generator=g), torch.randn(2, rows, cols, generator=g).square().sum(0)
    return z / (chi2 / 2).sqrt()


def awkward_blocks(cols: int = 512) -> torch.Tensor:
    """Rows that break careless quantisers: zeros, a constant, one spike, all negative, tiny and huge values."""
    rows = torch.zeros(6, cols)
    rows[1] = 0.3
    rows[2, 7] = -5.0
    rows[3] = -torch.linspace(0.1, 2.0, cols)
    rows[4] = torch.linspace(-1, 1, cols) * 1e-6
    rows[5] = torch.linspace(-1, 1, cols) * 3e4  # near f16's largest scale
    return rows


def block_errors(x: torch.Tensor, decoded: np.ndarray, block: int, weights=None) -> np.ndarray:
    err = (torch.from_numpy(decoded).reshape(x.shape) - x).square()
    if weights is not None:
        err = err * weights
    return err.reshape(-1, block).sum(-1).numpy()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("search", [True, False], ids=["search", "plain"])
def test_bytes_decode_to_the_values_the_quantiser_chose(qtype, search):
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    importance = torch.rand(512, generator=torch.Generator().manual_seed(1)) * 10
    for x, weights in ((data("gauss"), None), (data("heavy"), importance), (awkward_blocks(), None)):
        raw, values = quantize(x, qtype, weights, search=search)
        assert raw.dtype == np.uint8 and raw.shape == (len(x), 512 // block * type_size)
        decoded = dequantize(raw, qtype).reshape(x.shape)
        np.testing.assert_array_equal(decoded, values.numpy())
        assert np.isfinite(decoded).all()
    zeros = quantize(awkward_blocks(), qtype)[1]
    assert torch.equal(zeros[0], torch.zeros(512))  # a zero row stays zero


@pytest.mark.parametrize("qtype", REFERENCE, ids=lambda t: t.name)
def test_plain_rounding_is_ggml_reference_byte_for_byte(qtype):
    for x in (data("gauss"), data("heavy"), awkward_blocks()):
        np.testing.assert_array_equal(quantize(x, qtype, search=False)[0], gguf.quants.quantize(x.numpy(), qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gauss", "heavy"])
def test_scale_search_error_is_below_plain_rounding(qtype, kind):
    """Squared error as decoded by gguf: per block never above plain rounding for the 32-wide types
    (GGML's own reference quantiser there), and in total strictly below it, plain and weighted."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    x = data(kind)
    importance = torch.rand(512, generator=torch.Generator().manual_seed(2)).square() * 5
    for weights in (None, importance):
        searched = block_errors(x, dequantize(quantize(x, qtype, weights)[0], qtype), block, weights)
        plain_raw = gguf.quants.quantize(x.numpy(), qtype) if qtype in REFERENCE else \
            quantize(x, qtype, search=False)[0]
        plain = block_errors(x, dequantize(plain_raw, qtype), block, weights)
        if qtype in REFERENCE:
            assert (searched <= plain).all()
        assert searched.sum() < 0.99 * plain.sum(), (searched.sum(), plain.sum())


def test_importance_moves_error_to_the_columns_that_matter():
    x = data("gauss", cols=256)
    important = torch.zeros(256, dtype=torch.bool)
    important[::4] = True  # a quarter of the columns, spread over every block
    importance = torch.where(important, 100.0, 1.0)
    uniform = (quantize(x, T.Q4_0)[1] - x).square()
    weighted = (quantize(x, T.Q4_0, importance)[1] - x).square()
    assert weighted[:, important].mean() < 0.7 * uniform[:, important].mean()
    assert weighted[:, ~important].mean() > uniform[:, ~important].mean()  # paid for elsewhere


def test_tensor_types_follow_llama_quantize():
    L = 30  # use_more_bits(i, 30): i < 3, i >= 26, (i - 3) % 3 == 2 -> 0, 1, 2, 5, 8, ..., 26, 27, 28, 29
    more = [i for i in range(L) if tensor_qtype("q4_k", f"blk.{i}.attn_v.weight", 512, L, False)[0] == T.Q6_K]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    cases = [  # quant, name, row length, is the head -> (type, wanted)
        ("q4_k", "blk.5.ffn_down.weight", 1536, False, (T.Q6_K, T.Q6_K)),
        ("q4_k", "blk.6.ffn_down.weight", 1536, False, (T.Q4_K, T.Q4_K)),
        ("q4_k", "blk.6.attn_q.weight", 576, False, (T.Q5_0, T.Q4_K)),  # 576 = 2.25 * 256: fallback
        ("q5_k", "blk.6.attn_q.weight", 576, False, (T.Q5_1, T.Q5_K)),
        ("q6_k", "blk.6.attn_q.weight", 576, False, (T.Q8_0, T.Q6_K)),
        ("q5_k", "blk.5.attn_v.weight", 512, False, (T.Q6_K, T.Q6_K)),
        ("q6_k", "blk.5.attn_v.weight", 512, False, (T.Q6_K, T.Q6_K)),
        ("q4_0", "blk.5.attn_v.weight", 512, False, (T.Q4_0, T.Q4_0)),  # no mix for the 32-wide types
        ("q4_0", "token_embd.weight", 512, True, (T.Q6_K, T.Q6_K)),  # the head: Q6_K ...
        ("q4_0", "output.weight", 576, True, (T.Q8_0, T.Q6_K)),  # ... or Q8_0 where 256 does not divide
        ("q8_0", "output.weight", 512, True, (T.Q8_0, T.Q8_0)),
        ("q4_0", "token_embd.weight", 512, False, (T.Q4_0, T.Q4_0)),  # an embedding that is not the head
        ("q4_0", "blk.0.ffn_up.weight", 48, False, (T.F16, T.Q4_0)),  # no whole 32-value blocks
        ("q4_k", "blk.0.ffn_up.weight", 48, False, (T.F16, T.Q4_K)),
    ]
    for quant, name, cols, head, expected in cases:
        assert tensor_qtype(quant, name, cols, L, head) == expected, (quant, name, cols)


# ----------------------------------------------------------------------------- calibration and the written file

@pytest.fixture(scope="module")
def texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace")[:4000] for p in sorted(stdlib.glob("*.py"))[:40]]


@pytest.fixture(scope="module")
def k_model(tmp_path_factory, texts):
    """A model wide enough for K-quants' 256-value rows (hidden 256, MLP 512), and its folder. The head
    is its own matrix: a random model with a tied one only predicts its input token back."""
    tok = Tokenizer.train(texts, vocab_size=400)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=512, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(3)  # the matrices' initialisation; randomize seeds only the 1-D tensors it redraws
    model = randomize(Transformer(config), seed=3)
    with torch.no_grad():  # sharper predictions than an initialised model's
        model.lm_head.weight.mul_(3)
    folder = save_model_folder(tmp_path_factory.mktemp("kq") / "kq", model, tok)
    return folder, model, tok


def test_importance_is_the_mean_square_of_each_matrix_input(k_model):
    _, model, tok = k_model
    windows = [[tok.bos_id, *tok.encode("def f(x):\n    return x * 2\n")], tok.encode("import os, sys")]
    importance = collect_importance(model, windows)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(importance) == linear and "lm_head.weight" in importance  # the tied head too
    with torch.no_grad():  # the head's input: the final normed hidden states, independently of the hooks
        h = torch.cat([model.hidden_states(torch.tensor([w]))[0] for w in windows])
    torch.testing.assert_close(importance["lm_head.weight"], h.square().mean(0))
    assert importance["model.layers.1.mlp.down_proj.weight"].shape == (512,)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


@pytest.mark.parametrize("quant", list(QUANTS))
def test_quantised_export_reads_back_with_the_planned_types(k_model, tmp_path, quant, capsys):
    folder, model, _ = k_model
    path = export_gguf(folder, tmp_path / f"{quant}.gguf", quant=quant, calibration=None)
    fields, tensors = read_gguf(path)
    assert fields["general.file_type"] == QUANTS[quant][1]
    state = model.state_dict()
    for name, t in tensors.items():
        shape = tuple(int(n) for n in reversed(t.shape))
        if name.endswith("_norm.weight"):
            assert t.tensor_type == T.F32 and len(shape) == 1
            continue
        assert t.tensor_type == tensor_qtype(quant, name, shape[-1], 2, name == "output.weight")[0], name
        decoded = torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(shape)
        src = {"token_embd.weight": state["model.embed_tokens.weight"], "output.weight": state["lm_head.weight"],
               "blk.1.ffn_down.weight": state["model.layers.1.mlp.down_proj.weight"]}.get(name)
        if src is not None:  # tensors with no permutation: close to the source, as their type allows
            bits = {T.Q8_0: 8, T.Q6_K: 6, T.Q5_K: 5, T.Q5_0: 5, T.Q5_1: 5}.get(t.tensor_type, 4)
            rel = ((decoded - src).square().mean() / src.square().mean()).sqrt().item()
            assert rel < 2.0 ** -(bits - 2), (name, rel)
    assert "note:" not in capsys.readouterr().out  # 256 and 512 split into whole blocks: no fallback


def test_fallback_is_noted_and_calibration_file_errors_are_one_line(tmp_path, capsys, texts):
    tok = Tokenizer.train(texts, vocab_size=300)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    folder = save_model_folder(tmp_path / "m", randomize(Transformer(config), seed=4), tok)
    argv = ["export", "--model", str(folder), "--format", "gguf", "--quant", "q4_k", "--calibration", "none",
            "--out", str(tmp_path / "k.gguf")]
    assert main(argv) == 0
    _, tensors = read_gguf(tmp_path / "k.gguf")
    assert tensors["blk.0.attn_q.weight"].tensor_type == T.Q5_0 and tensors["token_embd.weight"].tensor_type == T.Q8_0
    out = capsys.readouterr().out
    assert "not a multiple of Q4_K's 256-value blocks) written as Q5_0" in out
    assert "written as Q8_0" in out  # the head: Q6_K wanted
    text = tmp_path / "cal.txt"
    text.write_text("\n".join(texts[:3]))
    fields, _ = read_gguf(export_gguf(folder, tmp_path / "c.gguf", quant="q4_0", calibration=str(text)))
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert "calibration: " in capsys.readouterr().out
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok " * 100 + b"\xff\xfe" + b"x" * 100)
    for source, message in ((str(tmp_path / "missing.txt"), "not a file"), (str(binary), "byte 300 is not UTF-8"),
                            (str(tmp_path / "c.gguf"), r"c.gguf: byte \d+ is not UTF-8; give a text file$"),
                            (str(folder), "not a file")):
        with pytest.raises(LmforgeError, match=message):
            export_gguf(folder, tmp_path / "x.gguf", quant="q4_0", calibration=source)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(LmforgeError, match="fewer than 256"):
        export_gguf(folder, tmp_path / "x.gguf", quant="q4_0", calibration=str(tmp_path / "short.txt"))
    with pytest.raises(LmforgeError, match="give one"):
        export_gguf(folder, tmp_path / "x.gguf", quant="q4_0", dtype="f16")
    assert not list(tmp_path.glob("x.gguf")) and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- a real runtime

@runtime
@pytest.mark.parametrize("quant", list(QUANTS))
def test_llama_cpp_runs_quantised_export_close_to_f32(k_model, tmp_path_factory, quant):
    """ik_llama.cpp's logits for the quantised file against its own for the F32 export, teacher-forced."""
    folder, _, tok = k_model
    work = tmp_path_factory.mktemp(quant)
    ids = [tok.bos_id, *tok.encode("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n")][:48]
    _, _, ref = run_llama_cpp(export_gguf(folder, work / "f32.gguf"), ["x"], ids)
    _, _, got = run_llama_cpp(export_gguf(folder, work / "q.gguf", quant=quant, calibration=None), ["x"], ids)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    p_ref = np.exp(log_softmax(ref))
    kl = (p_ref * (log_softmax(ref) - log_softmax(got))).sum(-1).mean()
    top1 = (ref.argmax(-1) == got.argmax(-1)).mean()
    # Measured (42 positions; a random model's predictions are flat, 4.6 nats, so near-ties flip):
    # q8_0 100% / KL 1e-4, q6_k 95% / 7e-4, 5-bit 88-93% / 2-2.6e-3, 4-bit 83-88% / 8-11e-3.
    # A block in the wrong byte order would be noise: KL ~ the entropy.
    bits = {"q8_0": 8, "q6_k": 6, "q5_0": 5, "q5_1": 5, "q5_k": 5}.get(quant, 4)
    assert top1 >= {8: 0.97, 6: 0.9, 5: 0.75, 4: 0.75}[bits], top1
    assert kl < {8: 5e-4, 6: 3e-3, 5: 1e-2, 4: 3e-2}[bits], kl
