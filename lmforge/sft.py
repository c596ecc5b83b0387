"""`lmforge sft`: supervised fine-tuning on conversations, full or with LoRA adapters.

    lmforge sft --run runs/base --data chats.jsonl --out runs/chat              # full fine-tuning
    lmforge sft --model models/smollm --data chats.jsonl --out runs/lora --lora-rank 16

Conversations (conversations.py: OpenAI-style `messages` or prompt/completion JSONL, every line
checked) are rendered through the model's chat template; the loss is on the assistant's tokens
only (its answers and their end-of-turn token). Examples are packed into rows of the context
length (posttrain.pack) and trained by the shared post-training loop (posttrain.fit). A
validation split (a file, or a deterministic hash slice of the data) gives the held-out loss.

The output folder is a run folder like pretraining's: `model/` holds the fine-tuned model (with
LoRA, the adapters merged into the weights), so `generate`, `chat`, `serve`, `eval` and `export`
take it with --run; with LoRA, `adapter/` holds the adapters alone in PEFT's layout as well.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmforge.checkpoint import load_model, save_model_folder
from lmforge.common import LmforgeError, atomic_write_text, get_device, print0, resolve_dtype, seed_everything
from lmforge.conversations import held_out, pad_token_id, read_conversations, render
from lmforge.posttrain import FitConfig, fit, fit_to_context, pack, read_settings, save_settings
from lmforge.tokenizer import load_tokenizer

SETTINGS_FILE = "sft_settings.json"  # what --resume restores


@dataclass
class SFTConfig:
    data: str
    val_data: str | None = None  # a separate validation file; else val_fraction of data, by content hash
    val_fraction: float = 0.05
    seq_len: int | None = None  # packed row length; default: the model's context, at most 1024
    too_long: str = "drop"  # or "truncate": conversations longer than seq_len
    on_bad_line: str = "skip"  # or "raise"
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # None: every attention and MLP projection
    device: str = "auto"
    dtype: str = "auto"
    fit: FitConfig = field(default_factory=lambda: FitConfig(out_dir="runs/sft"))


def load_settings(out_dir: str | Path) -> tuple[Path, Path, SFTConfig]:
    """(base model folder, tokenizer file, settings) an SFT run was started with, for --resume."""
    folder, tokenizer_path, config = read_settings(out_dir, SETTINGS_FILE, "a fine-tuning run folder")
    targets = config.pop("lora_targets")
    cfg = SFTConfig(**{**config, "fit": FitConfig(**config["fit"]),
                       "lora_targets": tuple(targets) if targets else None})
    return folder, tokenizer_path, cfg


def build_rows(tokenizer, conversations: list[list[dict]], seq_len: int, too_long: str,
               counts: dict) -> dict[str, torch.Tensor]:
    """Rendered, context-fitted and packed conversations: {"inputs", "targets"} (rows, seq_len)."""
    examples = fit_to_context([render(tokenizer, c) for c in conversations], seq_len, too_long, counts)
    if not examples:
        return {}
    inputs, targets = pack(examples, seq_len, pad_token_id(tokenizer))
    counts["trained_tokens"] = counts.get("trained_tokens", 0) + int((targets >= 0).sum())
    return {"inputs": inputs, "targets": targets}


def sft_loss(model, batch):
    return model(batch["inputs"], batch["targets"]), {}


def sft(folder: Path, tokenizer_path: Path, cfg: SFTConfig, *, resume: bool = False) -> dict:
    """Fine-tune the model in `folder`; write cfg.fit.out_dir/model (and adapter/ with LoRA)."""
    seed_everything(cfg.fit.seed)
    device = get_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(tokenizer_path)
    model = load_model(folder, device, dtype=torch.float32)  # fp32 master weights; autocast computes in dtype
    context = model.config.max_position_embeddings
    seq_len = cfg.seq_len or min(context, 1024)
    if not 8 <= seq_len <= context:
        raise LmforgeError(f"--seq-len {seq_len}: must be between 8 and the model's context ({context})")

    conversations, _, report = read_conversations(cfg.data, on_error=cfg.on_bad_line)
    print0(report.summary())
    if cfg.val_data:
        val_conversations, _, val_report = read_conversations(cfg.val_data, on_error=cfg.on_bad_line)
        print0(val_report.summary())
    else:
        is_val = [held_out(c, cfg.val_fraction) for c in conversations]
        val_conversations = [c for c, v in zip(conversations, is_val) if v]
        conversations = [c for c, v in zip(conversations, is_val) if not v]
    counts: dict = {"train_conversations": len(conversations), "val_conversations": len(val_conversations),
                    "bad_lines": dict(report.skipped)}
    train = build_rows(tokenizer, conversations, seq_len, cfg.too_long, counts)
    val_counts: dict = {}
    val = build_rows(tokenizer, val_conversations, seq_len, cfg.too_long, val_counts) or None
    counts["val_too_long"] = {k: v for k, v in val_counts.items() if k.startswith("too_long")}
    if not train:
        raise LmforgeError(f"no conversation fits in {seq_len} tokens; raise --seq-len or pass --too-long truncate")
    dropped = counts.get("too_long_dropped", 0) + counts.get("too_long_truncated", 0)
    print0(f"{len(conversations):,} training conversations in {train['inputs'].size(0):,} packed rows of {seq_len} "
           f"tokens ({counts['trained_tokens']:,} trained tokens); {len(val_conversations):,} for validation"
           + (f"; longer than {seq_len} tokens: {counts.get('too_long_dropped', 0)} dropped, "
              f"{counts.get('too_long_truncated', 0)} truncated" if dropped else ""))

    out = Path(cfg.fit.out_dir)
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        save_settings(out, SETTINGS_FILE, folder, tokenizer_path, cfg)
    lora = None
    if cfg.lora_rank > 0:
        from lmforge.lora import DEFAULT_TARGETS, LoraConfig, apply_lora

        lora = LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          target_modules=tuple(cfg.lora_targets or DEFAULT_TARGETS))
        lora.validate()
        adapted = apply_lora(model, lora)
        print0(f"LoRA rank {lora.rank} on {len(adapted)} modules")
    summary = fit(model, train, val, sft_loss, cfg.fit, device=device, dtype=dtype, resume=resume, stage="sft")

    if lora is not None:
        from lmforge.lora import merge_lora, save_adapter

        save_adapter(model, out / "adapter", lora, base_model=str(folder))
        merge_lora(model)
    summary.update(counts=counts, seq_len=seq_len, base=str(folder), lora=asdict(lora) if lora else None)
    save_model_folder(out / "model", model, tokenizer, extra={"sft": {k: summary[k] for k in ("steps", "final")}})
    atomic_write_text(out / "sft.json", json.dumps(summary, indent=2))
    return summary
