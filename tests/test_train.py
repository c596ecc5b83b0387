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

from lmforge.checkpoint import latest_checkpoint, load_model, save_checkpoint, save_model_folder
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


# ----------------------------------------------------------------------------- checkpoint files on disk

def _save_steps(run_dir: Path, steps, keep_last: int = 2):
    model = _tiny_model()
    optimizers = [torch.optim.AdamW(model.parameters())]
    for step in steps:
        model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])).backward()  # optimizer state to save
        optimizers[0].step()
        save_checkpoint(run_dir, step, model, optimizers, {"marker": step}, keep_last=keep_last)
    return model, optimizers


def test_rotation_keeps_the_newest_checkpoints_by_step_number(tmp_path):
    _save_steps(tmp_path, [998_000, 999_000, 1_000_000])
    # by name, step_1000000 sorts before step_999000: rotation by name deleted the newest
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_1000000", "step_999000"]
    assert latest_checkpoint(tmp_path).name == "step_1000000"


def test_a_resumed_run_keeps_the_checkpoint_it_saves(tmp_path):
    """Resumed from step 20 with a step 30 left by the run it replaces: the new step 21 is never rotated out."""
    _save_steps(tmp_path, [10, 20, 30], keep_last=3)
    (tmp_path / "checkpoints" / "latest").write_text("step_000020")
    _save_steps(tmp_path, [21], keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000020", "step_000021"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_checkpoint_files_and_folder_reach_the_disk_before_latest_names_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _save_steps(tmp_path, [5])
    root = tmp_path / "checkpoints"
    final = root / "step_000005"
    at = {e: i for i, e in enumerate(events)}
    folder_moves = [e for e in events if e[0] == "replace" and e[2] == str(final)]
    assert len(folder_moves) == 1
    moved = at[folder_moves[0]]
    tmp = folder_moves[0][1]
    file_syncs = [at.get(("fsync", f"{tmp}/{p.name}"), -1) for p in final.iterdir()]
    assert len(file_syncs) == 6 and min(file_syncs) >= 0, "every file of the folder is fsynced"
    assert max(file_syncs) < at[("fsync", tmp)] < moved, "files, then the folder, then the rename"
    latest_move = next(e for e in events if e[0] == "replace" and e[2] == str(root / "latest"))
    assert moved < events.index(("fsync", str(root)), moved) < at[latest_move], "the rename is durable first"
    assert ("fsync", latest_move[1]) in events[moved:at[latest_move]], "latest's new text is on disk first"
    assert ("fsync", str(root)) in events[at[latest_move]:], "and so is the new latest"


@pytest.mark.parametrize("damage", ["missing folder", "bad hash", "missing file", "truncated weights",
                                    "no manifest"])
def test_a_broken_latest_falls_back_to_the_newest_good_checkpoint(tmp_path, capsys, damage):
    from lmforge.checkpoint import resume_checkpoint

    _save_steps(tmp_path, [100, 200, 300], keep_last=3)
    broken = tmp_path / "checkpoints" / "step_000300"
    if damage == "missing folder":
        (tmp_path / "checkpoints" / "latest").write_text("step_000400")
        broken = broken.with_name("step_000400")
    elif damage == "bad hash":
        state = broken / "trainer_state.json"
        state.write_text(state.read_text().replace('"marker": 300', '"marker": 301'))
    elif damage == "missing file":
        (broken / "rng.safetensors").unlink()
    elif damage == "truncated weights":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        (broken / "manifest.json").unlink()
    model, optimizers = _save_steps(tmp_path / "other", [1])
    good = 300 if damage == "missing folder" else 200
    folder, state = resume_checkpoint(tmp_path, model, optimizers)
    assert folder.name == f"step_000{good}" and state["step"] == good and state["marker"] == good
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: ") and "\n" not in warning
    assert broken.name in warning and f"step_000{good}" in warning
    # without loading, only what can be seen cheaply: a bad hash shows when the checkpoint loads
    assert latest_checkpoint(tmp_path).name == ("step_000300" if damage == "bad hash" else f"step_000{good}")


def test_no_good_checkpoint_is_one_line_naming_each(tmp_path):
    from lmforge.checkpoint import resume_checkpoint

    model, optimizers = _save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        (tmp_path / "checkpoints" / f"step_{step:06d}" / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(LmforgeError) as e:
        resume_checkpoint(tmp_path, model, optimizers)
    assert "\n" not in str(e.value) and "step_000001" in str(e.value) and "step_000002" in str(e.value)
    with pytest.raises(LmforgeError, match="no checkpoint to resume from"):
        resume_checkpoint(tmp_path / "never-trained", model, optimizers)


def test_a_cut_metrics_line_is_dropped_and_the_rewrite_is_atomic(tmp_path):
    from lmforge.posttrain import rewind_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    inode = path.stat().st_ino
    rewind_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert path.stat().st_ino != inode, "rewritten through a new file and a rename, never in place"


def test_pretrain_resumes_past_a_broken_latest_and_a_cut_metrics_line(small_data, tmp_path):
    def config(out):
        return TrainConfig(data_dir=str(small_data), out_dir=str(out), max_steps=4, ckpt_every=2, batch_size=4,
                           **TINY)
    pretrain(config(tmp_path / "whole"))
    part = tmp_path / "part"
    pretrain(config(part))
    weights = part / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # the disk lost the tail of the newest checkpoint
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # and the log a cut last line
    pretrain(config(part), resume=True)
    assert losses(part) == losses(tmp_path / "whole")


def test_atomic_writes_get_the_permissions_a_plain_write_gets(tmp_path):
    """latest, tokenizer.json, configs: readable by whoever may read the folder, not only their writer."""
    from lmforge.base import atomic_write_text

    atomic_write_text(tmp_path / "a.json", "{}")
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "b.json").stat().st_mode
