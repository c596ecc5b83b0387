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

Folders are written under a fresh temporary name, fsynced (every file, then the folder) and renamed
into place, and the rename fsynced, before `checkpoints/latest` moves (an atomic, fsynced rewrite):
a run killed mid-write, or a power cut, leaves the previous checkpoint intact and `latest` naming a
complete one. Rotation keeps the newest checkpoints by step number (as text, step_1000000 sorts
before step_999000). A `latest` naming a missing or broken folder (a file missing, truncated or not
matching its manifest hash) falls back to the newest good checkpoint by step, with a warning.

Outputs a user names (import, export) never replace what is there unless asked: check_output
refuses a non-empty folder or an existing file without --overwrite, and with it the new output is
written beside the old and swapped in.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.base import fsync_dir, fsync_file, sha256_file
from lmforge.common import LmforgeError, atomic_write_text, print0
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


def _sibling(final: Path, kind: str) -> Path:
    """A name beside `final` that nothing has: temporary folders never reuse (or delete) an existing path."""
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}.{kind}")


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final` and fsync the parent. Whatever was at `final` is moved aside
    first and removed only once the new one is in place; if the rename fails it is put back."""
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    aside = _sibling(final, "old")
    os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink()


def _write_folder(final: Path, write, *, manifest: bool = True) -> Path:
    """Call write(tmp_folder), add a manifest, fsync it all, then swap the folder into place.

    Replaces a folder already at `final` as a whole; callers writing where a user points check_output first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 would make shared model folders unreadable to others
    try:
        write(tmp)
        if manifest:
            listing = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST_FILE).write_text(json.dumps({"files": listing}, indent=2))
        # data first, then the names: a rename that reaches the disk before the files would leave a
        # complete-looking folder of empty files after a power cut
        for p in sorted(tmp.rglob("*"), key=lambda p: -len(p.parts)):
            (fsync_dir if p.is_dir() else fsync_file)(p)
        fsync_dir(tmp)
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(out: Path, *, overwrite: bool, inputs: tuple = (), kind: str = "folder") -> None:
    """Refuse to write `out` (a "folder" or a "file") over anything lmforge did not make, unless `overwrite`:
    a non-empty folder or an existing file is named with the fix. Never a path that would delete an input
    (the input itself, a folder holding it, or a file inside an input folder), whatever `overwrite` says."""
    where = out.resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if _contains(where, source) or (where.exists() and _contains(source, where)):
            raise LmforgeError(f"--out {out}: writing there would replace the input {source}; choose another --out")
    if not (out.exists() or out.is_symlink()):
        return
    if kind == "file" and out.is_dir():
        raise LmforgeError(f"--out {out} is a folder; give the path of the file to write")
    if kind == "folder" and out.is_dir() and not any(out.iterdir()):
        return  # an empty folder made for the output
    if not overwrite:
        what = "a folder that is not empty" if out.is_dir() else "a file"
        raise LmforgeError(f"--out {out} is {what}; pass --overwrite to replace it, or choose another --out")


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

    for stale in [*ckpt_root.glob(".step_*.tmp"), *ckpt_root.glob(".step_*.old")]:  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    folder = _write_folder(ckpt_root / f"step_{step:06d}", write)
    atomic_write_text(ckpt_root / "latest", folder.name)  # only once the folder is on disk
    # The one just saved and the keep_last - 1 before it, by step number. Folders past this step are
    # from the run this one resumed from an earlier checkpoint: they are a history this run has left.
    earlier = [f for s, f in step_folders(ckpt_root) if s < step]
    keep = {folder, *earlier[max(0, len(earlier) - keep_last + 1):]}
    for _, old in step_folders(ckpt_root):
        if old not in keep:
            shutil.rmtree(old)
    return folder


STEP_FOLDER = re.compile(r"step_(\d+)")


def step_folders(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder under ckpt_root, oldest first by step number."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_FOLDER.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete training checkpoint, from what can be seen without reading it
    whole (every file listed in its manifest there, every safetensors file as long as its header
    says); None when it looks complete. The hashes are checked as a checkpoint loads."""
    if not folder.is_dir():
        return "missing"
    if not (folder / MANIFEST_FILE).is_file():
        return f"no {MANIFEST_FILE}, so it was never completed"
    try:
        listed = read_manifest(folder)
    except LmforgeError:
        return f"unreadable {MANIFEST_FILE}"
    for name in listed:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if name.endswith(".safetensors"):
            try:
                read_header(path)
            except LmforgeError:
                return f"{name} is truncated or corrupt"
    return None


def _first_good(run_dir: str | Path, use) -> tuple[Path | None, object, list[str]]:
    """(folder, use(folder), rejected) for the first checkpoint that passes checkpoint_problem and
    use(folder) (which may raise LmforgeError): the one `latest` names, then the rest newest first
    by step. `rejected` names each one passed over and why; a warning says so when any was."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    order = [f for _, f in reversed(step_folders(root))]
    rejected = []
    if named is not None:
        if STEP_FOLDER.fullmatch(named):
            order = [root / named] + [f for f in order if f.name != named]
        else:
            rejected.append(f"{named!r} in latest (not a step_N name)")
    elif order:
        rejected.append("latest (missing)")
    for folder in order:
        problem = checkpoint_problem(folder)
        if problem is None:
            try:
                result = use(folder)
            except LmforgeError as e:
                problem = str(e)
            else:
                if rejected:
                    print0(f"warning: {root}: passed over {'; '.join(rejected)}; using {folder.name}, the newest "
                           "good checkpoint", file=sys.stderr)
                return folder, result, rejected
        rejected.append(f"{folder.name} ({problem})")
    return None, None, rejected


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or when that one is missing or incomplete the newest complete one
    by step (with a warning); None when there is none. Its hashes are checked when it loads."""
    folder, _, rejected = _first_good(run_dir, lambda folder: None)
    if folder is None and rejected:
        print0(f"warning: {Path(run_dir) / 'checkpoints'}: no complete checkpoint: {'; '.join(rejected)}",
               file=sys.stderr)
    return folder


def resume_checkpoint(run_dir: str | Path, model: torch.nn.Module, optimizers: list) -> tuple[Path, dict]:
    """Load the newest good checkpoint of run_dir into model and optimizers (load_checkpoint), falling
    back past broken ones with a warning; (folder, trainer state). One-line error when none is good."""
    folder, state, rejected = _first_good(run_dir, lambda folder: load_checkpoint(folder, model, optimizers))
    if folder is not None:
        return folder, state
    if not rejected:
        raise LmforgeError(f"--resume: {run_dir} has no checkpoint to resume from; start without --resume")
    raise LmforgeError(f"--resume: {Path(run_dir) / 'checkpoints'} has no usable checkpoint: {'; '.join(rejected)}. "
                       "Start again without --resume")


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
