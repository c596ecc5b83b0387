"""Open weights: Hugging Face checkpoints imported and run by lmforge, and lmforge models exported.

Every source model is a tiny random one that `transformers` builds and saves here (no downloads),
with its weights nudged off their initial values so that norms and biases matter.
"""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizerCore
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM

from lmforge.checkpoint import load_model, save_model_folder
from lmforge.common import LmforgeError
from lmforge.generate import generate
from lmforge.hf import config_from_hf, export_hf, import_hf
from lmforge.model import ModelConfig, Transformer
from lmforge.weights import iter_tensors

VOCAB = 320
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
FAMILIES = {
    # Llama 3 style: rope scaling "llama3", untied head
    "llama3": dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # SmolLM / TinyLlama layout: tied head, one key/value head
    "smollm": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=1),
    "llama-biases": dict(model_type="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", sliding_window=8, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False),  # 4 x 32 != 64
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


def make_tokenizer_json(folder):
    """A byte-level BPE tokenizer.json small enough for the test vocabularies."""
    tok = HFTokenizerCore(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))


def hf_model_folder(tmp_path, family: str, dtype=torch.float32, **save_kwargs):
    fields = dict(FAMILIES[family])
    model_type = fields.pop("model_type")
    base = {} if model_type == "gpt2" else SMALL
    config = AutoConfig.for_model(model_type, **{**base, **fields})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.to(dtype)
    folder = tmp_path / f"hf-{family}"
    model.save_pretrained(folder, **save_kwargs)
    make_tokenizer_json(folder)
    return folder, model


def greedy_hf(model, prompt: list[int], num_tokens: int, vocab: int | None = None) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(num_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1, :vocab].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_model_matches_transformers(tmp_path, family):
    folder, theirs = hf_model_folder(tmp_path, family)
    ours = load_model(import_hf(folder, tmp_path / "imported")).eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))  # > mistral's window
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{family}: max |logit difference| {diff:.2e}"
    prompt = ids[0, :5].tolist()
    ours_greedy = list(generate(ours, prompt, max_tokens=32, temperature=0))
    assert ours_greedy == greedy_hf(theirs, prompt, 32)


def test_bf16_and_fp16_checkpoints_load_in_their_precision(tmp_path):
    folder, _ = hf_model_folder(tmp_path, "qwen3")
    reference = load_model(import_hf(folder, tmp_path / "fp32")).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    for dtype in (torch.bfloat16, torch.float16):
        half_folder, _ = hf_model_folder(tmp_path / str(dtype), "qwen3", dtype=dtype)
        model = load_model(import_hf(half_folder, tmp_path / f"imported-{dtype}")).eval()
        assert {p.dtype for p in model.parameters()} == {dtype}
        with torch.no_grad():
            logits = model(ids)
            expected = reference(ids)
        assert logits.dtype == dtype
        assert (logits.float() - expected).abs().max() < 0.1  # half precision, same model
        assert len(list(generate(model, ids[0].tolist(), max_tokens=4, temperature=0))) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama3", "qwen3", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_run_on_cuda_like_transformers(tmp_path, family, dtype):
    folder, theirs = hf_model_folder(tmp_path, family, dtype=dtype)
    ours = load_model(import_hf(folder, tmp_path / "imported"), device="cuda").eval()
    theirs = theirs.cuda().eval()
    assert {(p.dtype, p.device.type) for p in ours.parameters()} == {(dtype, "cuda")}
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        logits, expected = ours(ids), theirs(ids).logits
    assert logits.dtype == dtype
    assert (logits.float() - expected.float()).abs().max() < 0.1  # same weights, kernels round differently
    assert len(list(generate(ours, ids[0, :4].tolist(), max_tokens=8, temperature=0))) == 8


def test_sharded_checkpoint_imports_like_a_single_file(tmp_path):
    single, _ = hf_model_folder(tmp_path / "a", "llama3")
    sharded, _ = hf_model_folder(tmp_path / "b", "llama3", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    one = dict(iter_tensors(import_hf(single, tmp_path / "one") / "model.safetensors"))
    many = dict(iter_tensors(import_hf(sharded, tmp_path / "many") / "model.safetensors"))
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_weights_are_refused_unless_opted_in_and_then_only_tensors(tmp_path):
    folder, theirs = hf_model_folder(tmp_path, "smollm")
    (folder / "model.safetensors").unlink()
    torch.save(theirs.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(LmforgeError, match="pickles.*--allow-pickle"):
        import_hf(folder, tmp_path / "out")
    ours = load_model(import_hf(folder, tmp_path / "out", allow_pickle=True))
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4
    # A pickle that would run code when unpickled: weights_only refuses it, nothing runs.
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _RunsCode()}, f)
    with pytest.raises(LmforgeError, match="weights_only"):
        import_hf(folder, tmp_path / "evil", allow_pickle=True)


def test_impossible_configs_and_weights_name_the_field_or_tensor(tmp_path):
    folder, _ = hf_model_folder(tmp_path, "llama3")
    raw = json.loads((folder / "config.json").read_text())
    without_head_dim = {k: v for k, v in raw.items() if k != "head_dim"}  # transformers 4 wrote none
    with pytest.raises(LmforgeError, match="num_attention_heads=5 does not divide hidden_size=64"):
        config_from_hf({**without_head_dim, "num_attention_heads": 5, "num_key_value_heads": 5})
    with pytest.raises(LmforgeError, match="num_key_value_heads=3 does not divide num_attention_heads=4"):
        config_from_hf({**raw, "num_key_value_heads": 3})
    with pytest.raises(LmforgeError, match="model_type 'bert'"):
        config_from_hf({**raw, "model_type": "bert"})
    with pytest.raises(LmforgeError, match="rope_scaling type 'yarn'"):
        config_from_hf({**raw, "rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    (folder / "config.json").write_text(json.dumps({**raw, "intermediate_size": 100}))
    with pytest.raises(LmforgeError, match=r"mlp.gate_proj.weight has shape \(96, 64\), config.json implies"):
        import_hf(folder, tmp_path / "out")
    (folder / "config.json").write_text(json.dumps({**raw, "num_attention_heads": 5, "num_key_value_heads": 5}))
    with pytest.raises(LmforgeError, match=r"q_proj.weight has shape \(64, 64\), config.json implies \(80, 64\)"):
        import_hf(folder, tmp_path / "out")
    (folder / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 3}))
    with pytest.raises(LmforgeError, match="tensor model.layers.2.input_layernorm.weight is missing"):
        import_hf(folder, tmp_path / "out")


def test_import_verifies_its_manifest_on_load(tmp_path):
    folder, _ = hf_model_folder(tmp_path, "qwen2")
    out = import_hf(folder, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= manifest.keys()
    data = bytearray((out / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="sha256 does not match"):
        load_model(out)


def test_lmforge_model_round_trips_through_transformers(tmp_path, small_data):
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(small_data / "tokenizer.json")
    config = ModelConfig.from_depth(2, tokenizer.vocab_size, 64, aspect_ratio=32, head_dim=16, kv_group=2)
    model = Transformer(config).eval()
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = save_model_folder(tmp_path / "model", model, tokenizer, extra={"step": 7, "val_bpb": 2.5})
    out = export_hf(folder, tmp_path / "hf")
    from transformers import AutoTokenizer

    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "def fib(n):\n    return n  # ünïcode ✓"
    ids = tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False).input_ids == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x) - theirs(x).logits).abs().max() <= 1e-4
    assert list(generate(model, ids, max_tokens=32, temperature=0)) == greedy_hf(theirs, ids, 32)
    assert "val_bpb" in (out / "README.md").read_text()
    # ... and back: the import of the export holds the original tensors, bit for bit
    back = load_model(import_hf(out, tmp_path / "back"))
    original = model.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_loading_costs_about_the_checkpoint_size_in_memory(tmp_path):
    # 8192 x 1024 bf16 embedding + head and a few layers: ~60 MB; peak RSS while loading is measured
    # in a fresh process from the point just before load_model (VmHWM reset through clear_refs).
    # A first, tiny load pays the one-off cost that does not grow with the model: building modules
    # on the meta device imports PyTorch's Python decompositions (~75 MB of code and tables).
    config = ModelConfig(vocab_size=8192, hidden_size=1024, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1024, max_position_embeddings=64,
                         tie_word_embeddings=False)
    folder = save_model_folder(tmp_path / "m", Transformer(config).to(torch.bfloat16))
    tiny = save_model_folder(tmp_path / "tiny", Transformer(ModelConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=16)))
    size = (folder / "model.safetensors").stat().st_size
    script = f"""
import gc, torch
from lmforge.checkpoint import load_model
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
load_model({str(tiny)!r})
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
before = status("VmRSS:")
model = load_model({str(folder)!r})
print(status("VmHWM:") - before, next(model.parameters()).dtype)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    extra_bytes, dtype = int(out[0]), out[1]
    assert dtype == "torch.bfloat16"
    assert extra_bytes <= 1.2 * size, f"loading {size / 1e6:.0f} MB took {extra_bytes / 1e6:.0f} MB"


def test_cli_imports_generates_and_exports(tmp_path, capsys):
    from lmforge.cli import main

    folder, theirs = hf_model_folder(tmp_path, "gpt2")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    model_dir = tmp_path / "imported"
    assert main(["import", str(folder), "--out", str(model_dir)]) == 0
    assert (model_dir / "chat_template.jinja").exists()
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--prompt", "def fib(", "--max-tokens", "6",
                 "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    from lmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    prompt = tokenizer.encode("def fib(")
    assert tokenizer.vocab_size < VOCAB  # the embedding table has rows no token owns: never sampled
    expected = greedy_hf(theirs, prompt, 6, vocab=tokenizer.vocab_size)
    eos = expected.index(tokenizer.eos_id) if tokenizer.eos_id in expected else len(expected)
    assert text == "def fib(" + tokenizer.decode(expected[:eos]) + "\n"

    assert main(["export", "--model", str(model_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "hf-again")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf-again") is not None
    capsys.readouterr()

    # a folder that is no model, and a tokenizer the embedding table cannot hold: one line each
    assert main(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "vocab_size": 100}))
    assert main(["import", str(folder), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size is 100" in err
    assert "\n" not in err
    assert not (tmp_path / "y").exists()


def test_import_and_export_never_replace_a_folder_they_did_not_make(tmp_path, capsys):
    from lmforge.cli import main

    folder, _ = hf_model_folder(tmp_path, "smollm")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    model_dir = tmp_path / "imported"
    assert main(["import", str(folder), "--out", str(model_dir)]) == 0
    capsys.readouterr()

    def refused(argv, target):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(target) in err and "--overwrite" in err, err

    refused(["import", str(folder), "--out", str(mine)], mine)
    refused(["export", "--model", str(model_dir), "--out", str(mine)], mine)
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"someone else's file")
    refused(["export", "--model", str(model_dir), "--format", "gguf", "--out", str(gguf_file)], gguf_file)
    assert (mine / "notes.txt").read_text() == "keep me" and gguf_file.read_bytes() == b"someone else's file"

    # asked to, each replaces the target whole: nothing of the old one is mixed into the new
    assert main(["export", "--model", str(model_dir), "--out", str(mine), "--overwrite"]) == 0
    assert not (mine / "notes.txt").exists() and AutoModelForCausalLM.from_pretrained(mine) is not None
    assert main(["import", str(folder), "--out", str(mine), "--overwrite"]) == 0
    assert not (mine / "README.md").exists() and load_model(mine) is not None
    assert main(["export", "--model", str(model_dir), "--format", "gguf", "--out", str(gguf_file),
                 "--overwrite"]) == 0
    assert gguf_file.read_bytes()[:4] == b"GGUF"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["import", str(folder), "--out", str(empty)]) == 0  # an empty folder made for it is fine
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary siblings left"
    capsys.readouterr()

    # never over its own input, --overwrite or not
    assert main(["import", str(folder), "--out", str(folder), "--overwrite"]) == 2
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "would replace the input" in capsys.readouterr().err
    assert (folder / "config.json").exists() and (model_dir / "model.safetensors").exists()
