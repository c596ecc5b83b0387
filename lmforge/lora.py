"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), applied from outside.

A frozen projection W (out, in) learns only a low-rank update, scaled by alpha / r:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A (r, in), B (out, r)

`apply_lora` swaps each targeted nn.Linear for a `LoraLinear` that holds the *same* weight and
bias tensors (no copy) plus the two adapters, and freezes everything else; the model file does
not know LoRA exists. Because `LoraLinear` subclasses nn.Linear, the frozen tensors keep their
exact names (`model.layers.0.self_attn.q_proj.weight`) and the adapters sit beside them
(`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`), the names PEFT gives them. A starts as
PEFT (and the paper's reference loralib) starts it, B at zero, so an adapted model begins equal
to its base.

`merge_lora` folds the update into W and swaps plain nn.Linear back: an ordinary model that
saves, exports and serves like any other. `save_adapter` / `load_adapter` use PEFT's on-disk
layout (adapter_model.safetensors + adapter_config.json), so `peft.PeftModel.from_pretrained`
loads our adapters onto the exported base model, and we load adapters PEFT trained.

Only nn.Linear is adapted. GPT-2's projections (gpt2.py) are Conv1D, weight stored (in, out);
targeting them raises an error rather than guessing. The output head is refused too: the fused
training loss reads `lm_head.weight` directly (ops.lm_head_output), so an adapter there would
never train.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lmforge.checkpoint import _write_folder, read_manifest, unwrap, verify_manifest
from lmforge.common import LmforgeError
from lmforge.weights import iter_tensors, read_header

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's names: PeftModel.base_model (LoraModel).model (the HF model)
# adapter_config.json options PEFT has and lmforge's LoRA does not; a truthy value is refused.
UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "modules_to_save", "layers_to_transform",
               "rank_pattern", "alpha_pattern", "layer_replication", "trainable_token_indices", "target_parameters")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input only
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # matched against each module's last name component

    def validate(self) -> None:
        """Raise LmforgeError naming the field when the setting cannot work."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LmforgeError(f"lora config: rank={self.rank!r} must be an integer >= 1")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LmforgeError(f"lora config: alpha={self.alpha!r} must be a number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LmforgeError(f"lora config: dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise LmforgeError(f"lora config: target_modules={self.target_modules!r} must be a non-empty tuple of "
                               f"module names, e.g. {DEFAULT_TARGETS}")


class LoraLinear(nn.Linear):
    """nn.Linear plus a low-rank update; shares the base module's weight and bias tensors."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), the same Parameter object
        self.register_parameter("bias", base.bias)  # (out,) or None
        self.rank, self.scaling = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)  # weight (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init, as PEFT
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts as the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every module apply_lora would adapt; LmforgeError when that is none or impossible."""
    config.validate()
    found, linear, other = [], set(), set()
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, LoraLinear):
            raise LmforgeError(f"{name} already has LoRA adapters; merge_lora first, or start from the base model")
        if isinstance(module, nn.Linear):
            linear.add(last)
        elif getattr(getattr(module, "weight", None), "ndim", 0) == 2 and not isinstance(module, nn.Embedding):
            other.add(f"{last} ({type(module).__name__})")
        if last not in config.target_modules:
            continue
        if not isinstance(module, nn.Linear):
            raise LmforgeError(f"lora config: target_modules names {last!r}, but {name} is a {type(module).__name__}, "
                               "not an nn.Linear; LoRA here adapts nn.Linear projections only (GPT-2's Conv1D "
                               "layers, weight stored (in, out), are not supported)")
        if name == "lm_head":
            raise LmforgeError("lora config: target_modules names 'lm_head'; the output head cannot be adapted "
                               "(the fused training loss reads its weight directly, so an adapter would not train)")
        found.append((name, module))
    if not found:
        hint = f"; other layers with weights: {', '.join(sorted(other))}" if other else ""
        raise LmforgeError(f"lora config: target_modules={tuple(config.target_modules)} match no nn.Linear module of "
                           f"this model; its nn.Linear modules are named {', '.join(sorted(linear))}{hint}")
    return found


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Swap every targeted nn.Linear for a LoraLinear in place and freeze all but the adapters.

    Apply it to the bare model, before DDP or torch.compile wrap it. Returns the adapted module names.
    """
    model = unwrap(model)
    targets = _targets(model, config)
    model.requires_grad_(False)
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoraLinear(module, config.rank, config.alpha, config.dropout))
    return [name for name, _ in targets]


def _lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LoraLinear)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only, by their names in the model: {'...q_proj.lora_A.weight': (r, in), ...}."""
    out = {}
    for name, m in _lora_modules(model):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def num_lora_params(model: nn.Module) -> int:
    return sum(t.numel() for t in lora_state_dict(model).values())


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W += (alpha / r) B A in every adapted module, then plain nn.Linear back in its place.

    The sum is taken in fp32 and cast back once (a bf16 W would lose the small update in a bf16 add).
    Every parameter trains again afterwards, as in a freshly loaded model.
    """
    model = unwrap(model)
    modules = _lora_modules(model)
    if not modules:
        raise LmforgeError("merge_lora: the model has no LoRA adapters (apply_lora or load_adapter first)")
    for name, m in modules:
        delta = m.lora_B.weight.float() @ m.lora_A.weight.float()  # (out, r) @ (r, in) = (out, in)
        m.weight.copy_((m.weight.float() + m.scaling * delta).to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")  # no allocation
        plain.weight, plain.bias = m.weight, m.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    model.requires_grad_(True)


def save_adapter(model: nn.Module, folder: str | Path, config: LoraConfig, base_model: str | None = None) -> Path:
    """Write the adapters in PEFT's layout, atomically (a temporary folder renamed into place, with a manifest).

    base_model is what PEFT records as base_model_name_or_path (a hub id or a folder), None if unknown.
    """
    modules = _lora_modules(model)
    if not modules:
        raise LmforgeError("save_adapter: the model has no LoRA adapters (apply_lora or load_adapter first)")
    for name, m in modules:
        if m.rank != config.rank or not math.isclose(m.scaling, config.alpha / config.rank):
            raise LmforgeError(f"save_adapter: {name} has rank {m.rank}, scaling {m.scaling:g}, but the config says "
                               f"rank {config.rank}, alpha {config.alpha}; pass the config the adapters were made with")
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    peft_config = {  # the fields peft.LoraConfig reads; the rest take PEFT's defaults
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }

    def write(tmp: Path):
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")

    return _write_folder(Path(folder), write)


def read_adapter_config(folder: str | Path) -> LoraConfig:
    """The LoraConfig an adapter folder (ours or PEFT's) describes; refuses PEFT options lmforge cannot run."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        raise LmforgeError(f"{folder}: no {ADAPTER_CONFIG}; not a LoRA adapter folder (save_adapter writes one)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e}); the adapter is corrupt") from None
    if raw.get("peft_type") != "LORA":
        raise LmforgeError(f"{path}: peft_type={raw.get('peft_type')!r}; lmforge loads LoRA adapters only")
    if raw.get("bias", "none") != "none":
        raise LmforgeError(f"{path}: bias={raw['bias']!r} (trained biases) is not supported; only bias 'none'")
    for key in UNSUPPORTED:
        if raw.get(key):
            raise LmforgeError(f"{path}: {key}={raw[key]!r} is not supported by lmforge's LoRA")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        raise LmforgeError(f"{path}: target_modules={targets!r}; lmforge needs a list of module names (not a regex)")
    config = LoraConfig(rank=raw.get("r"), alpha=raw.get("lora_alpha"), dropout=raw.get("lora_dropout", 0.0),
                        target_modules=tuple(sorted(targets)))  # PEFT writes a set: any order
    try:
        config.validate()
    except LmforgeError as e:
        raise LmforgeError(f"{path}: {e}") from None
    return config


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """apply_lora with the saved config, then fill the adapters; every tensor is checked before the
    model is touched, so a bad adapter leaves the model as it was."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    path = folder / ADAPTER_WEIGHTS
    if not path.exists():
        raise LmforgeError(f"{folder}: no {ADAPTER_WEIGHTS}; the adapter folder is incomplete, copy it again")
    verify_manifest(folder, skip=(ADAPTER_WEIGHTS,))
    header, _, _ = read_header(path)
    found = {k.removeprefix(PEFT_PREFIX): tuple(v["shape"]) for k, v in header.items()}
    expected = {}
    for name, m in _targets(unwrap(model), config):
        expected[f"{name}.lora_A.weight"] = (config.rank, m.in_features)
        expected[f"{name}.lora_B.weight"] = (m.out_features, config.rank)
    for name, shape in expected.items():
        if name not in found:
            raise LmforgeError(f"{path}: tensor {PEFT_PREFIX}{name} is missing; the adapter was made for another "
                               "model (or other target_modules). Load it onto the base model it was trained on")
        if found[name] != shape:
            raise LmforgeError(f"{path}: tensor {PEFT_PREFIX}{name} has shape {found[name]}, this model with "
                               f"rank {config.rank} needs {shape}; load it onto the base model it was trained on")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise LmforgeError(f"{path}: unexpected tensors {[PEFT_PREFIX + n for n in unexpected[:3]]}; this model has "
                           "no such modules. Load it onto the base model it was trained on")
    tensors = dict(iter_tensors(path, sha256=read_manifest(folder).get(ADAPTER_WEIGHTS)))  # hash checked first
    apply_lora(model, config)
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name.removeprefix(PEFT_PREFIX)].copy_(tensor)
    return config
