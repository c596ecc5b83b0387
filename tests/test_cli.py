"""The command line: the --tiny pipeline end to end, and one-line errors for bad input."""

import json
import sys

import pytest
import torch

from lmforge.checkpoint import save_model_folder
from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer


def one_line_error(capsys, argv, match: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    return err


def test_tiny_pipeline_end_to_end(tmp_path, capsys):
    assert main(["run", "--tiny", "--runs-dir", str(tmp_path), "--name", "t", "--quiet"]) == 0
    run = tmp_path / "t"
    for name in ("tokenizer.json", "metrics.jsonl", "samples.md", "eval.json", "loss.png", "report.md",
                 "model/model.safetensors", "model/tokenizer.json", "model/manifest.json", "checkpoints/latest",
                 "chat/model/model.safetensors", "chat/code_train.jsonl", "chat/code_eval.json"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    initial_bpb = records[0]["val_bpb"]
    final = json.loads((run / "eval.json").read_text())
    assert final["bpb"] < 0.85 * initial_bpb, "training did not learn"
    report = (run / "report.md").read_text()
    assert f"{final['bpb']:.3f}" in report and "xz -9" in report and "zlib -9" in report
    manifest = json.loads((run / "data" / "manifest.json").read_text())  # the corpus went through the pipeline
    assert f"- data pipeline: {manifest['counts']['documents_in']:,} documents in" in report
    assert (run / "data" / "data_card.md").exists()
    code = json.loads((run / "chat" / "code_eval.json").read_text())  # the SFT stage: base vs chat, same requests
    assert code["val_tasks"] == code["base"]["n"] == code["chat"]["n"] == len(code["answers"]) == 16
    assert code["train_tasks"] > 500 and code["sft"]["steps"] == 8
    for model in ("base", "chat"):
        assert sum(code[model]["outcomes"].values()) == 16
        assert f"{code[model]['passed']}/16" in report
    capsys.readouterr()

    assert main(["generate", "--run", str(run), "--prompt", "def fib(", "--max-tokens", "8", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("def fib(") and len(first) > len("def fib(\n")
    main(["generate", "--run", str(run), "--prompt", "def fib(", "--max-tokens", "8", "--seed", "1"])
    assert capsys.readouterr().out == first  # same seed, same text

    assert main(["tokenizer", "show", "def fib(n):", "--run", str(run), "--no-color"]) == 0
    shown = capsys.readouterr().out
    tok = Tokenizer.load(run / "tokenizer.json")
    assert all(str(i) in shown for i in tok.encode("def fib(n):"))

    assert main(["eval", "--run", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["bpb"] == pytest.approx(final["bpb"], rel=1e-4)
    one_line_error(capsys, ["eval", "--run", str(run), "--seq-len", "100000"], "outside the model's context")


def test_missing_and_empty_corpus(tmp_path, capsys):
    one_line_error(capsys, ["run", "--tiny", "--corpus", str(tmp_path / "nope"), "--runs-dir", str(tmp_path)],
                   "no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    (empty / "binary.txt").write_bytes(b"\x00\xff" * 10)
    assert main(["run", "--tiny", "--quiet", "--corpus", str(empty), "--runs-dir", str(tmp_path / "r")]) == 2
    *warnings, err = capsys.readouterr().err.strip().splitlines()  # each bad file named, then the one error
    assert "no readable documents" in err and "1 binary" in err and "1 empty" in err and "Traceback" not in err
    assert sorted(w.split(": ")[-1] for w in warnings) == ["binary", "empty"]
    assert all(w.startswith(f"warning: {empty}/") for w in warnings)


@pytest.fixture()
def model_folder(tmp_path, small_data):
    tok = Tokenizer.load(small_data / "tokenizer.json")
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16)
    model = Transformer(config)
    model.init_weights(seed=0)
    return save_model_folder(tmp_path / "m", model, tok)


def test_prompt_longer_than_context(model_folder, capsys):
    one_line_error(capsys, ["generate", "--model", str(model_folder), "--prompt", "x = 1\n" * 40],
                   "context")


def test_corrupt_checkpoint(model_folder, capsys):
    weights = model_folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x55  # same size, one byte changed
    weights.write_bytes(bytes(data))
    one_line_error(capsys, ["generate", "--model", str(model_folder), "--prompt", "x"], "sha256 does not match")
    weights.write_bytes(bytes(data[:-7]))
    one_line_error(capsys, ["generate", "--model", str(model_folder), "--prompt", "x"], "truncated")
    (model_folder / "manifest.json").unlink()
    weights.write_bytes(b"PK\x03\x04 a zip file, say")
    one_line_error(capsys, ["generate", "--model", str(model_folder), "--prompt", "x"], "not a safetensors file")


def test_mismatched_checkpoint(model_folder, capsys):
    (model_folder / "manifest.json").unlink()
    config = json.loads((model_folder / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (model_folder / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, ["generate", "--model", str(model_folder), "--prompt", "x"],
                   "tensor model.layers.1.input_layernorm.weight is missing")


def test_missing_run_and_resume_without_checkpoint(tmp_path, capsys, small_data):
    one_line_error(capsys, ["generate", "--run", str(tmp_path / "none"), "--prompt", "x"], "no such run folder")
    one_line_error(capsys, ["pretrain", "--out", str(tmp_path / "fresh"), "--resume"], "not a run folder")
    one_line_error(capsys, ["pretrain", "--data", str(small_data), "--out", str(tmp_path / "o")], "--steps N")


def test_bad_sampling_flags(model_folder, capsys):
    one_line_error(capsys, ["generate", "--model", str(model_folder), "--prompt", "x", "--top-p", "1.5"], "--top-p")


def test_cuda_request_without_gpu(model_folder, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_error(capsys, ["generate", "--model", str(model_folder), "--prompt", "x", "--device", "cuda"],
                   "CUDA is not available")


def test_stop_strings_take_the_escapes_a_shell_passes_through():
    """`--stop "\\n\\n"` reaches the program as backslash, n, backslash, n: the README's two newlines."""
    from lmforge.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x", "--stop", r"\n\n",
                                      "--stop", r"a\tb\\n\u00e9\x41", "--stop", r"\d+ é", "--stop", "\n",
                                      "--stop", r"\UFFFFFFFF"])
    # unknown escapes, code points past Unicode and real newlines stay as given
    assert args.stop == ["\n\n", "a\tb\\néA", r"\d+ é", "\n", r"\UFFFFFFFF"]


def test_a_missing_optional_dependency_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    (tmp_path / "doc.txt").write_text("a document\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as it does where Ray is not installed
    err = one_line_error(capsys, ["data", "prepare", str(tmp_path / "doc.txt"), "--executor", "ray",
                                  "--out", str(tmp_path / "out"), "--quiet"], "pip install 'lmforge[ray]'")
    assert "--executor ray" in err and not (tmp_path / "out").exists()  # refused before any work

    # any command whose module cannot be imported: one line naming the module, not a traceback
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.delitem(sys.modules, "lmforge.export_gguf", raising=False)
    one_line_error(capsys, ["export", "--model", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "x")],
                   "the Python module 'gguf' is not installed")
