"""Open weights in and out: Hugging Face checkpoints imported as lmforge model folders, and
lmforge model folders exported as folders `transformers` loads as they are.

lmforge's tensor names are Hugging Face's (model.py, gpt2.py), so moving weights is a copy:
import streams every tensor of the source (one file or shards named by an index) into one
model.safetensors, export copies that file byte for byte. What needs translating is config.json,
one small function per direction:

    family    HF config quirks handled here                               runs in
    llama     attention_bias (q/k/v/o), mlp_bias, head_dim, rope scaling   model.py
    mistral   sliding_window                                               model.py
    qwen2     q/k/v biases always on, o_proj without                       model.py
    qwen3     q_norm/k_norm, head_dim apart from the width                 model.py
    gpt2      learned positions, LayerNorm, Conv1D (own field names)       gpt2.py

Rotary settings are read in both spellings: `rope_theta` + `rope_scaling` (transformers 4) and
`rope_parameters` (transformers 5); export writes both.

Both write where `--out` points only when that is new, an empty folder, or (`overwrite`) a folder
to replace: the output is written in a temporary sibling and swapped in whole, never mixed into
or deleted from what a user had there (checkpoint.check_output).

Security: weights are read from safetensors only. PyTorch pickles (.bin/.pt/.pth) can run code
when unpickled, so they are refused unless the user opts in, and even then read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lmforge.checkpoint import (
    ARCHITECTURES,
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    _write_folder,
    build_model,
    check_output,
    check_tensor_names,
    config_from_dict,
    read_config,
    verify_manifest,
)
from lmforge.common import LmforgeError
from lmforge.tokenizer import load_tokenizer
from lmforge.weights import DTYPES, read_header, write_tensors

# Files besides config and weights that travel with a model unchanged (tokenizer, chat template,
# sampling defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# GPT-2 keeps these causal-mask buffers in older checkpoints; SDPA needs neither.
_GPT2_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


# ----------------------------------------------------------------------------- config translation

def _rope_from_hf(raw: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling or None) from either transformers 4 or 5 spelling."""
    params = dict(raw.get("rope_parameters") or {})
    theta = raw.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = dict(raw.get("rope_scaling") or params or {})
    if "type" in scaling and "rope_type" not in scaling:  # the oldest spelling
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def config_from_hf(raw: dict, source: str = "config.json"):
    """lmforge's config for a Hugging Face config.json (a dict)."""
    model_type = raw.get("model_type")
    if model_type == "gpt2":
        return config_from_dict(raw, source)
    if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise LmforgeError(f"{source}: model_type {model_type!r} is not one lmforge imports; supported: "
                           f"{', '.join(ARCHITECTURES)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{source}: hidden_act {raw['hidden_act']!r}; lmforge's {model_type} runs silu only")
    if raw.get("use_sliding_window"):
        raise LmforgeError(f"{source}: use_sliding_window=true (sliding attention in some layers only) is not "
                           "supported; set it to false if the model was trained without it")
    theta, scaling = _rope_from_hf(raw)
    fields = dict(
        model_type=model_type, vocab_size=raw.get("vocab_size"), hidden_size=raw.get("hidden_size"),
        num_hidden_layers=raw.get("num_hidden_layers"), num_attention_heads=raw.get("num_attention_heads"),
        num_key_value_heads=raw.get("num_key_value_heads") or raw.get("num_attention_heads"),
        intermediate_size=raw.get("intermediate_size"), max_position_embeddings=raw.get("max_position_embeddings"),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=raw.get("tie_word_embeddings", False), head_dim=raw.get("head_dim"),
        mlp_bias=raw.get("mlp_bias", False))
    if model_type == "qwen2":
        fields.update(qkv_bias=True, o_proj_bias=False)
    else:  # llama, mistral, qwen3: attention_bias puts a bias on all four projections
        fields.update(qkv_bias=raw.get("attention_bias", False), o_proj_bias=raw.get("attention_bias", False))
    if model_type == "qwen3":
        fields["qk_norm"] = True
    if model_type == "mistral":
        fields["sliding_window"] = raw.get("sliding_window")
    return config_from_dict(fields, source)


def config_to_hf(config, dtype: torch.dtype, tokenizer=None) -> dict:
    """The config.json `transformers` expects for this config (AutoConfig picks the class by model_type)."""
    out = {"architectures": [ARCHITECTURES[config.model_type]]}
    if config.model_type == "gpt2":
        out.update(config.to_dict())
    else:
        c = config
        if c.qkv_bias != c.o_proj_bias and c.model_type != "qwen2":
            raise LmforgeError(f"{c.model_type} config: q/k/v and o_proj biases differ; Hugging Face's "
                               f"{ARCHITECTURES[c.model_type]} cannot express that")
        if c.model_type == "qwen2" and (not c.qkv_bias or c.o_proj_bias):
            raise LmforgeError("qwen2 config: Qwen2 has q/k/v biases and no o_proj bias")
        rope = {"rope_type": "default", **(c.rope_scaling or {})}
        out.update(
            model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim, hidden_act="silu", max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
            rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, rope_parameters={**rope, "rope_theta": c.rope_theta},
            attention_dropout=0.0)
        if c.model_type != "qwen2":
            out.update(attention_bias=c.qkv_bias)
        if c.model_type == "llama":
            out.update(mlp_bias=c.mlp_bias)
        if c.model_type in ("mistral", "qwen2", "qwen3"):
            out.update(sliding_window=c.sliding_window, use_sliding_window=False)
    out["torch_dtype"] = out["dtype"] = str(dtype).removeprefix("torch.")
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    return out


# ----------------------------------------------------------------------------- import

def _weight_sources(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of an HF folder, safetensors preferred; pickles only with the opt-in."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise LmforgeError(f"{index}: unreadable shard index ({e})") from None
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise LmforgeError(f"{folder}: shard {missing[0]} named in {index.name} is missing; download it too")
        return [folder / s for s in shards]
    single = sorted(folder.glob("*.safetensors"))
    if single:
        return single
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise LmforgeError(f"{folder}: no *.safetensors weights here; is this a model folder?")
    if not allow_pickle:
        raise LmforgeError(f"{folder}: weights are PyTorch pickles ({pickles[0].name}), which can run code when "
                           "loaded, so lmforge does not read them by default. Get the .safetensors version of "
                           "this model, or pass --allow-pickle to read them with torch.load(weights_only=True)")
    return pickles


class _SourceTensors:
    """Name -> tensor across a model's weight files, read one tensor at a time."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple] = {}  # name -> (file, entry, data_start) or (file, None, None)
        self._pickled: dict[Path, dict] = {}
        for path in files:
            if path.suffix == ".safetensors":
                header, _, data_start = read_header(path)
                for name, entry in header.items():
                    self.where[name] = (path, entry, data_start)
            else:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's problem
                    raise LmforgeError(f"{path}: torch.load(weights_only=True) refused it ({e})") from None
                self._pickled[path] = state
                for name in state:
                    self.where[name] = (path, None, None)

    def shape(self, name: str) -> tuple[int, ...]:
        path, entry, _ = self.where[name]
        return tuple(entry["shape"]) if entry is not None else tuple(self._pickled[path][name].shape)

    def dtype(self, name: str) -> torch.dtype:
        path, entry, _ = self.where[name]
        return DTYPES[entry["dtype"]] if entry is not None else self._pickled[path][name].dtype

    def read(self, name: str) -> torch.Tensor:
        path, entry, data_start = self.where[name]
        if entry is None:
            return self._pickled[path][name]
        tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        with open(path, "rb") as f:
            f.seek(data_start + entry["data_offsets"][0])
            f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        return tensor


def _source_names(config, names: list[str]) -> dict[str, str]:
    """lmforge name -> source name. Identity, except bare GPT-2 checkpoints (no `transformer.`)."""
    mapping = {}
    for name in names:
        if config.model_type == "gpt2":
            if name.endswith(_GPT2_MASK_BUFFERS):
                continue
            ours = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        else:
            ours = name
        mapping[ours] = name
    return mapping


def import_hf(source: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
              allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Turn a local Hugging Face model folder into an lmforge model folder at `out`: a new or empty
    folder, or with `overwrite` a folder it replaces whole once the new one is complete."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise LmforgeError(f"{source}: no such folder; download the model first (e.g. `hf download NAME "
                           "--local-dir FOLDER`) and pass that folder")
    check_output(out, overwrite=overwrite, inputs=(source,))  # before any work: a refusal costs nothing
    if not (source / CONFIG_FILE).exists():
        raise LmforgeError(f"{source}: no config.json; a Hugging Face model folder has one beside the weights")
    if not (source / TOKENIZER_FILE).exists():
        hint = " (it has tokenizer.model: convert it with transformers' AutoTokenizer and save_pretrained)" \
            if (source / "tokenizer.model").exists() else ""
        raise LmforgeError(f"{source}: no tokenizer.json{hint}")
    try:
        raw = json.loads((source / CONFIG_FILE).read_text())
    except ValueError as e:
        raise LmforgeError(f"{source / CONFIG_FILE}: not valid JSON ({e})") from None
    config = config_from_hf(raw, str(source / CONFIG_FILE))
    tokenizer = load_tokenizer(source)  # read now, so a broken tokenizer fails before any weights are copied
    if tokenizer.vocab_size > config.vocab_size:
        raise LmforgeError(f"{source}: tokenizer.json has {tokenizer.vocab_size:,} tokens but config.json's "
                           f"vocab_size is {config.vocab_size:,}; the embedding table has no row for the rest")
    tensors = _SourceTensors(_weight_sources(source, allow_pickle))
    names = _source_names(config, list(tensors.where))

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        names.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway: the same tensor
    elif "lm_head.weight" not in names:
        raise LmforgeError(f"{source}: tensor lm_head.weight is missing and tie_word_embeddings is false")
    check_tensor_names(source, {ours: tensors.shape(theirs) for ours, theirs in names.items()}, expected)

    def target_dtype(name: str) -> torch.dtype:
        return dtype if dtype is not None else tensors.dtype(names[name])

    def write(tmp: Path):
        specs = [(name, expected[name], target_dtype(name)) for name in expected]
        write_tensors(tmp / WEIGHTS_FILE, specs, lambda name: tensors.read(names[name]).to(target_dtype(name)),
                      metadata={"format": "pt"})
        hf_source = {k: raw.get(k) for k in ("_name_or_path", "model_type", "architectures") if k in raw}
        config_json = {**config.to_dict(), "architectures": [ARCHITECTURES[config.model_type]],
                       "lmforge": {"imported_from": str(source.resolve()), "source_config": hf_source}}
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json, indent=2))
        for name in SIDE_FILES:
            if (source / name).exists():
                shutil.copyfile(source / name, tmp / name)

    return _write_folder(out, write)


# ----------------------------------------------------------------------------- export

def _model_card(config, config_json: dict, folder: Path, run_dir: Path | None) -> str:
    facts = config_json.get("lmforge") or {}
    lines = [f"# {folder.name if run_dir is None else run_dir.name}", "",
             f"A {config.model_type} causal language model exported by lmforge.", "", "## Model", "",
             "| field | value |", "|---|---|"]
    for key, value in config.to_dict().items():
        lines.append(f"| {key} | {value} |")
    if facts:
        lines += ["", "## Training", "", "| fact | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in facts.items()]
    if run_dir is not None and (run_dir / "eval.json").exists():
        result = json.loads((run_dir / "eval.json").read_text())
        lines += ["", "## Held-out evaluation", "", f"- bits per byte: {result.get('bpb', float('nan')):.4f}"]
        for name, bpb in (result.get("compressors") or {}).items():
            lines.append(f"- {name} on the same bytes: {bpb:.4f} bits per byte")
    if run_dir is not None and (run_dir / "report.md").exists():
        lines += ["", "The training run's full report is `report.md` in its run folder."]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]
    return "\n".join(lines)


def export_hf(folder: str | Path, out: str | Path, *, run_dir: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Write `out` as a folder `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load as is: a new
    or empty folder, or with `overwrite` a folder it replaces whole (written beside it, then swapped in)."""

    folder, out = Path(folder), Path(out)
    check_output(out, overwrite=overwrite, inputs=(folder, run_dir))
    verify_manifest(folder)
    config = read_config(folder)
    config_json = json.loads((folder / CONFIG_FILE).read_text())
    header, _, _ = read_header(folder / WEIGHTS_FILE)
    embedding = next(k for k in header if "embed_tokens" in k or k.endswith("wte.weight"))
    dtype = DTYPES[header[embedding]["dtype"]]
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.exists() and run_dir is not None:
        tokenizer_file = Path(run_dir) / TOKENIZER_FILE
    tokenizer = load_tokenizer(tokenizer_file)

    def write(tmp: Path):
        shutil.copyfile(folder / WEIGHTS_FILE, tmp / WEIGHTS_FILE)  # already Hugging Face names and layout
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype, tokenizer), indent=2) + "\n")
        tokenizer.export_hf(tmp, model_max_length=config.max_position_embeddings)
        if (folder / "generation_config.json").exists():
            shutil.copyfile(folder / "generation_config.json", tmp / "generation_config.json")
        else:
            generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                          "pad_token_id": tokenizer.pad_id, "max_length": config.max_position_embeddings}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(config, config_json, folder,
                                                   Path(run_dir) if run_dir is not None else None))

    return _write_folder(out, write, manifest=False)  # exactly the files transformers expects
