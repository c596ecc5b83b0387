"""Checkpoints and model folders: safetensors weights + JSON, written atomically, verified on load.

A *model folder* is what users share and load:
    config.json         model config (Hugging Face field names, `model_type` says which model
                        file runs it: model.py for the Llama family, gpt2.py) + "lmforge" block
    model.safetensors   weights, Hugging Face names; a tied lm_head is not stored twice
    tokenizer.json      the tokenizer (Hugging Face format)
    manifest.json       sha256 of every file above; loading refuses a mismatch

A *training checkpoint* (runs/<name>/checkpoints/step_NNNNNN/) is a model folder without the
tokenizer plus what exact resumption needs: optimizer.safetensors (every optimizer tensor),
trainer_state.json (step, schedule, loader position, optimizer scalars and param groups) and
rng.safetensors. Nothing here is ever unpickled.

Loading builds the model on the meta device and reads each tensor straight into its final
storage (weights.py), hashing the file on the way: a checkpoint costs its own size in memory
and is read once.

Folders are written under a temporary name and renamed into place, so a run killed mid-write
leaves the previous checkpoint intact; `checkpoints/latest` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.base import sha256_file
from lmforge.common import LmforgeError, atomic_write_text
from lmforge.model import ModelConfig, Transformer
from lmforge.weights import iter_tensors, read_header

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, MANIFEST_FILE = (
    "config.json", "model.safetensors", "tokenizer.json", "manifest.json")
TRAINABLE_FILE = "trainable.safetensors"  # post-training checkpoints: only the parameters that train
# model_type -> the Hugging Face class that loads the same folder
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def unwrap(model: torch.nn.Module) -> Transformer:
    """The bare Transformer under DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _write_folder(final: Path, write) -> Path:
    """Call write(tmp_folder), add a manifest, then swap the folder into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    manifest = {"files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def read_manifest(folder: Path) -> dict[str, str]:
    """{file name: sha256}; empty for folders made by other tools (the weights' own checks still apply)."""
    path = folder / MANIFEST_FILE
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text())["files"])
    except (ValueError, KeyError, TypeError):
        raise LmforgeError(f"{path}: unreadable manifest; the folder is corrupt. "
                           "Copy it again from its source") from None


def verify_manifest(folder: Path, skip: tuple[str, ...] = ()) -> None:
    """Check every file listed in manifest.json except `skip` (files the caller hashes as it reads)."""
    for name, digest in read_manifest(folder).items():
        if name in skip:
            continue
        f = folder / name
        if not f.exists():
            raise LmforgeError(f"{folder}: {name} is listed in manifest.json but missing; the copy is incomplete")
        if sha256_file(f) != digest:
            raise LmforgeError(f"{f}: sha256 does not match manifest.json; the file is corrupt or was changed. "
                               "Copy it again from its source")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the same storage as the token embedding
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _write_model(folder: Path, model: torch.nn.Module, extra: dict | None) -> None:
    config = {**model.config.to_dict(), "architectures": [ARCHITECTURES[model.config.model_type]],
              "lmforge": extra or {}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(_weights(model), folder / WEIGHTS_FILE, metadata={"format": "pt"})


def save_model_folder(folder: str | Path, model: torch.nn.Module, tokenizer=None, extra: dict | None = None) -> Path:
    model = unwrap(model)

    def write(tmp: Path):
        _write_model(tmp, model, extra)
        from lmforge.tokenizer import HFTokenizer

        if isinstance(tokenizer, HFTokenizer):  # an imported tokenizer keeps its config (chat template, specials)
            tokenizer.export_hf(tmp)
        elif tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)

    return _write_folder(Path(folder), write)


def config_from_dict(raw: dict, source: str = "config"):
    """The model config a config.json describes: ModelConfig, or GPT2Config for model_type gpt2."""
    if raw.get("model_type", "llama") == "gpt2":
        from lmforge.gpt2 import GPT2Config
        cls = GPT2Config
    else:
        cls = ModelConfig
    try:
        return cls.from_dict({k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
    except LmforgeError as e:
        raise LmforgeError(f"{source}: {e}") from None


def build_model(config) -> torch.nn.Module:
    if config.model_type == "gpt2":
        from lmforge.gpt2 import GPT2
        return GPT2(config)
    return Transformer(config)


def read_config(folder: Path):
    path = folder / CONFIG_FILE
    if not path.exists():
        raise LmforgeError(f"{folder}: no {CONFIG_FILE}; this is not an lmforge model folder or checkpoint")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e}); the checkpoint is corrupt") from None
    return config_from_dict(raw, str(path))


def check_tensor_names(path: Path, found: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Every expected tensor present with its shape, nothing else; the error names the tensor."""
    for name, shape in expected.items():
        if name not in found:
            raise LmforgeError(f"{path}: tensor {name} is missing")
        if tuple(found[name]) != tuple(shape):
            raise LmforgeError(f"{path}: tensor {name} has shape {tuple(found[name])}, "
                               f"config.json implies {tuple(shape)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise LmforgeError(f"{path}: unexpected tensors {unexpected[:3]}; it does not match config.json")


def load_model(folder: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the model from config.json and fill it from model.safetensors, checking every tensor.

    The weights keep the checkpoint's precision (a bf16 checkpoint runs in bf16) unless `dtype`
    is given; a file mixing precisions takes that of its token embedding.
    """
    folder = Path(folder)
    verify_manifest(folder, skip=(WEIGHTS_FILE,))
    config = read_config(folder)
    with torch.device("meta"):
        model = build_model(config)
    path = folder / WEIGHTS_FILE
    if not path.exists():
        raise LmforgeError(f"{folder}: no {WEIGHTS_FILE}")
    header, _, _ = read_header(path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    check_tensor_names(path, {k: v["shape"] for k, v in header.items()}, expected)
    if dtype is None:
        embedding = next(k for k in expected if "embed_tokens" in k or k.endswith("wte.weight"))
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[header[embedding]["dtype"]]
    tensors = dict(iter_tensors(path, sha256=read_manifest(folder).get(WEIGHTS_FILE), dtype=dtype))
    model.load_state_dict(tensors, strict=False, assign=True)
    model.init_buffers()  # tied weights and tables that are not stored, now on a real device
    return model.to(device)


# ----------------------------------------------------------------------------- training checkpoints

def _optimizer_to_files(optimizers: list[torch.optim.Optimizer]) -> tuple[dict, list]:
    """Split optimizer state dicts into tensors (for safetensors) and JSON-able rest."""
    tensors, meta = {}, []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars = {}
        for pid, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{i}.{pid}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars[f"{pid}.{key}"] = value
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, meta


def _optimizer_from_files(optimizers, tensors: dict, meta: list) -> None:
    for i, (opt, m) in enumerate(zip(optimizers, meta)):
        state: dict = {}
        for name, value in tensors.items():
            o, pid, key = name.split(".", 2)
            if int(o) == i:
                state.setdefault(int(pid), {})[key] = value
        for name, value in m["scalars"].items():
            pid, key = name.split(".", 1)
            state.setdefault(int(pid), {})[key] = value
        opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: all of them in full fine-tuning, the adapters with LoRA."""
    return {n: p.detach().contiguous().cpu() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizers: list,
                    trainer_state: dict, keep_last: int = 2, *, trainable_only: bool = False) -> Path:
    """A training checkpoint folder. trainable_only (post-training) stores only the parameters that
    train, in trainable.safetensors: the rest is the base model folder, loaded again on resume."""
    ckpt_root = Path(run_dir) / "checkpoints"
    model = unwrap(model)
    opt_tensors, opt_meta = _optimizer_to_files(optimizers)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for k, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{k}"] = s
    state = {**trainer_state, "step": step, "optimizers": opt_meta, "python_rng": random.getstate()}

    def write(tmp: Path):
        if trainable_only:
            save_file(trainable_weights(model), tmp / TRAINABLE_FILE)
        else:
            _write_model(tmp, model, {"step": step})
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))

    folder = _write_folder(ckpt_root / f"step_{step:06d}", write)
    atomic_write_text(ckpt_root / "latest", folder.name)
    for old in sorted(ckpt_root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)
    return folder


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if folder.exists() else None


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizers: list) -> dict:
    """Restore weights, optimizer state and RNG in place; return the trainer state."""
    target = unwrap(model)
    if (folder / TRAINABLE_FILE).exists():
        verify_manifest(folder)
        saved, expected = load_file(folder / TRAINABLE_FILE), trainable_weights(target)
        check_tensor_names(folder / TRAINABLE_FILE, {k: v.shape for k, v in saved.items()},
                           {k: v.shape for k, v in expected.items()})
        with torch.no_grad():
            for name, p in target.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
    else:
        loaded = load_model(folder, device="cpu")
        if loaded.config != target.config:
            raise LmforgeError(f"{folder}: checkpoint model config differs from this run's "
                               f"({loaded.config} vs {target.config}); resume with the same model settings")
        target.load_state_dict(loaded.state_dict())
    state = json.loads((folder / "trainer_state.json").read_text())
    _optimizer_from_files(optimizers, load_file(folder / "optimizer.safetensors"), state["optimizers"])
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


def resolve_model_folder(run: str | None = None, model: str | None = None) -> tuple[Path, Path]:
    """(weights folder, tokenizer file) for --run RUN_DIR or --model MODEL_DIR."""
    if (run is None) == (model is None):
        raise LmforgeError("name exactly one of --run RUN_FOLDER or --model MODEL_FOLDER")
    if model is not None:
        folder = Path(model)
        if not folder.is_dir():
            raise LmforgeError(f"--model {model}: no such folder")
        return folder, folder / TOKENIZER_FILE
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise LmforgeError(f"--run {run}: no such run folder; `lmforge run` creates one under runs/")
    if (run_dir / "model" / WEIGHTS_FILE).exists():
        return run_dir / "model", run_dir / "model" / TOKENIZER_FILE
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise LmforgeError(f"--run {run}: no model/ and no checkpoint yet; train first (lmforge pretrain)")
    return ckpt, run_dir / TOKENIZER_FILE
