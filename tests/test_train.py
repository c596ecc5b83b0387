"""Training loop invariants: exact resume after a kill, DDP parity, divergence, checkpoints."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import load_model, save_model_folder
from lmforge.common import LmforgeError
from lmforge.evaluate import compressor_bpb, evaluate_bpb
from lmforge.model import ModelConfig, Transformer
from lmforge.optim import Muon, lr_multiplier, zeropower_newton_schulz
from lmforge.train import TrainConfig, pretrain

TINY = dict(depth=1, aspect_ratio=32, head_dim=16, seq_len=32, eval_tokens=256, eval_every=1000, log_every=1,
            warmup_steps=3, progress=False)
CLI = [sys.executable, "-m", "lmforge.cli", "pretrain"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def cli_args(data, out, steps, **extra):
    args = [f"--data={data}", f"--out={out}", f"--steps={steps}", "--quiet", "--depth=1", "--aspect-ratio=32",
            "--head-dim=16", "--seq-len=32", "--eval-tokens=256", "--eval-every=1000", "--log-every=1",
            "--warmup-steps=3"]
    return args + [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]


def test_killed_run_resumes_with_the_same_losses(small_data, tmp_path):
    steps = 60
    whole = tmp_path / "whole"
    subprocess.run(CLI + cli_args(small_data, whole, steps, ckpt_every=10, batch_size=4), env=ENV, check=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(CLI + cli_args(small_data, killed, steps, ckpt_every=10, batch_size=4), env=ENV)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not (pointer.exists() and pointer.read_text().strip() >= "step_000020") and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to save anything on the way out
    proc.wait()
    resumed_from = int(pointer.read_text().strip().removeprefix("step_"))
    assert resumed_from < steps, "the run finished before it was killed: nothing was tested"
    subprocess.run(CLI + [f"--out={killed}", "--resume", "--quiet"], env=ENV, check=True)

    assert len(losses(killed)) == steps
    assert losses(killed) == losses(whole)  # bit for bit
    a, b = load_file(whole / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_torchrun_matches_one_process(small_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # fp32: on a CPU with fast bf16 (AVX512-BF16, AMX) autocast would round the two layouts differently
    subprocess.run(CLI + cli_args(small_data, one, 3, batch_size=4, dtype="fp32"), env=ENV, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "lmforge.cli", "pretrain"] + cli_args(small_data, two, 3, batch_size=2, dtype="fp32"), env=ENV,
                   check=True,
                   timeout=300)
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_divergence_is_reported_not_saved(small_data, tmp_path):
    cfg = TrainConfig(data_dir=str(small_data), out_dir=str(tmp_path), max_steps=5, optimizer="adamw", lr=1e30,
                      grad_clip=1e30, **TINY)
    with pytest.raises(LmforgeError, match="diverged at step"):
        pretrain(cfg)
    assert not (tmp_path / "model").exists()


def test_grad_accumulation_equals_the_big_batch(small_data, tmp_path):
    big = pretrain(TrainConfig(data_dir=str(small_data), out_dir=str(tmp_path / "a"), max_steps=2, batch_size=4,
                               **TINY))
    acc = pretrain(TrainConfig(data_dir=str(small_data), out_dir=str(tmp_path / "b"), max_steps=2, batch_size=2,
                               grad_accum=2, **TINY))
    # the loader hands the same windows in the same order; only float summation order differs
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)
    assert big["tokens"] == acc["tokens"]


def test_checkpointing_switch_keeps_the_losses(small_data, tmp_path):
    plain = pretrain(TrainConfig(data_dir=str(small_data), out_dir=str(tmp_path / "a"), max_steps=2, **TINY))
    ckpt = pretrain(TrainConfig(data_dir=str(small_data), out_dir=str(tmp_path / "b"), max_steps=2,
                                grad_checkpointing=True, **TINY))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-6)
    assert plain["final_loss"] == pytest.approx(ckpt["final_loss"], rel=1e-6)


def test_schedules():
    kw = dict(total_steps=100, warmup_steps=10)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(55, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(100, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_multiplier(59, schedule="wsd", decay_frac=0.4, **kw) == 1.0
    assert lr_multiplier(80, schedule="wsd", decay_frac=0.4, **kw) == pytest.approx(0.5)
    assert lr_multiplier(100, schedule="wsd", decay_frac=0.4, **kw) == pytest.approx(0.0)


def test_muon_orthogonalises_each_matrix_of_a_batch_alike_in_fp32_and_bf16():
    torch.manual_seed(0)
    stack = torch.randn(3, 40, 24)  # tall: iterated on the transposed, wide side
    batched = zeropower_newton_schulz(stack)
    assert torch.equal(batched, torch.stack([zeropower_newton_schulz(g) for g in stack]))
    for out in (batched, zeropower_newton_schulz(stack, dtype=torch.bfloat16).float()):
        singular = torch.linalg.svdvals(out)
        assert singular.min() > 0.6 and singular.max() < 1.25  # the quintic lands in ~[0.7, 1.2]
    # The optimizer's step, which groups matrices by shape, moves each one as it would alone.
    params = [torch.nn.Parameter(torch.randn(8, 6)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(6, 8))]
    alone = [p.detach().clone() for p in params]
    for p, a in zip(params, alone):
        p.grad = torch.randn_like(p)
        # first step: the Nesterov update is a multiple of the gradient, which the normalisation removes
        a -= 0.1 * max(1.0, p.size(0) / p.size(1)) ** 0.5 * zeropower_newton_schulz(p.grad)
    Muon([dict(params=params, lr=0.1)]).step()
    for p, a in zip(params, alone):
        torch.testing.assert_close(p.detach(), a)


def _tiny_model(**kw) -> Transformer:
    config = ModelConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=16, **kw)
    model = Transformer(config)
    model.init_weights(seed=0)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_model_folder_round_trip(tmp_path, tied):
    model = _tiny_model(tie_word_embeddings=tied)
    save_model_folder(tmp_path / "m", model)
    loaded = load_model(tmp_path / "m")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert ("lm_head.weight" in load_file(tmp_path / "m" / "model.safetensors")) == (not tied)


def test_corrupt_or_mismatched_checkpoints_are_refused(tmp_path):
    save_model_folder(tmp_path / "m", _tiny_model())
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="sha256 does not match"):
        load_model(tmp_path / "m")

    save_model_folder(tmp_path / "n", _tiny_model())
    (tmp_path / "n" / "manifest.json").unlink()
    config = json.loads((tmp_path / "n" / "config.json").read_text())
    config["intermediate_size"] = 64
    (tmp_path / "n" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match=r"mlp.gate_proj.weight has shape \(32, 16\)"):
        load_model(tmp_path / "n")
    config["num_attention_heads"] = 3
    (tmp_path / "n" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match="num_attention_heads=3 does not divide hidden_size=16"):
        load_model(tmp_path / "n")


def test_bits_per_byte_on_a_hand_computed_case():
    """A model that puts uniform probability on V tokens costs log2(V) bits per token."""
    V = 50
    model = _tiny_model()
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.zeros(V, 16))  # untie: all logits 0 -> uniform
    tokens = torch.tensor([0, 5, 6, 7, 0, 8, 9]).numpy()  # 0 is <|bos|>, 0 bytes
    token_bytes = torch.full((V,), 2)
    token_bytes[0] = 0
    result = evaluate_bpb(model, tokens, token_bytes, seq_len=4, batch_size=1, device=torch.device("cpu"))
    # 5 byte-carrying targets x log2(50) bits over 10 bytes; the bos target counts in neither
    assert result["num_bytes"] == 10
    assert result["bpb"] == pytest.approx(5 * math.log2(V) / 10, rel=1e-6)


def test_compressor_baselines_compress_repetitive_text():
    result = compressor_bpb(b"def f(x):\n    return x\n" * 200)
    assert 0 < result["xz -9"] < 1 and 0 < result["zlib -9"] < 1
