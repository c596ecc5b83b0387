"""What every post-training stage shares: token packing, an epoch order that resumes exactly, and
the optimisation loop over a fixed dataset (SFT, DPO and the reward model all train that way;
RL makes its data as it goes and has its own loop in rl.py).

The loop: warm-up then cosine (or WSD) learning rate, gradient accumulation, clipping, autocast,
a held-out loss every eval_every steps, checkpoints of only the parameters that train (with
LoRA a checkpoint is the adapters and their optimizer state, a few MB), and `resume` continuing
with exactly the batches, learning rates and random state an uninterrupted run would have had
(from the newest good checkpoint, past a broken one; metrics.jsonl rewound to its step, a cut
last line dropped).
A stage supplies `loss_fn(model, batch) -> (loss, {name: tensor})`; the named figures (DPO's
reward accuracy, say) are averaged over each logging window and over the held-out set.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.base import rewind_metrics  # noqa: F401 - rl.py takes it from here with the other shared pieces
from lmforge.checkpoint import resume_checkpoint, save_checkpoint
from lmforge.common import LmforgeError, atomic_write_text, autocast, print0
from lmforge.optim import build_optimizers, lr_multiplier, set_lr

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def pack(examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack (ids, trained) examples into rows of seq_len tokens: inputs and next-token targets (N, seq_len).

    Best-fit decreasing: each example, longest first, goes into the fullest row it still fits, so
    rows are nearly full and no example is split. A target is -1 (ignored) unless the token it
    predicts is trained, so a row's padding and the step from one example into the next (whose
    first token is context) cost nothing. Every example starts with its template's bos, and, as
    in GPT-style pretraining on packed documents, a later example in a row can attend to an
    earlier one; the bos marks the break.
    """
    width = seq_len + 1  # a row of inputs plus the token after its last
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for i in order:
        n = len(examples[i][0])
        assert n <= width, "examples are cut to the context before packing"
        fits = [r for r in range(len(rows)) if room[r] >= n]
        if fits:
            r = min(fits, key=lambda r: room[r])
        else:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    trained = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, members in enumerate(rows):
        at = 0
        for i in sorted(members):  # file order inside a row
            tokens, mask = examples[i]
            ids[r, at:at + len(tokens)] = torch.tensor(tokens)
            trained[r, at:at + len(tokens)] = torch.tensor(mask)
            at += len(tokens)
    targets = ids[:, 1:].masked_fill(~trained[:, 1:], -1)
    return ids[:, :-1].contiguous(), targets


def pad_rows(examples: list[tuple[list[int], list[bool]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One example per row, right-padded to the longest: inputs and next-token targets (N, T), -1 = not trained."""
    T = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (ids, trained) in enumerate(examples):
        ids_t, mask = torch.tensor(ids), torch.tensor(trained)
        inputs[i, :len(ids) - 1] = ids_t[:-1]
        targets[i, :len(ids) - 1] = ids_t[1:].masked_fill(~mask[1:], -1)
    return inputs, targets


def fit_to_context(examples: list[tuple[list[int], list[bool]]], context: int, too_long: str,
                   counts: dict) -> list[tuple[list[int], list[bool]]]:
    """Examples longer than the context (context + 1 tokens, counting the last target) are dropped,
    or with too_long='truncate' cut to it; counts['too_long_dropped'/'too_long_truncated'] say how many.
    A cut that leaves nothing to learn drops the example."""
    if too_long not in ("drop", "truncate"):
        raise LmforgeError(f"--too-long {too_long}: choose drop or truncate")
    kept = []
    for ids, trained in examples:
        if len(ids) > context + 1:
            if too_long == "drop" or not any(trained[1:context + 1]):
                counts["too_long_dropped"] = counts.get("too_long_dropped", 0) + 1
                continue
            counts["too_long_truncated"] = counts.get("too_long_truncated", 0) + 1
            ids, trained = ids[:context + 1], trained[:context + 1]
        kept.append((ids, trained))
    return kept


class EpochSampler:
    """Batches of row indices, reshuffled every epoch from (seed, epoch): position is one number."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        if num_rows == 0:
            raise LmforgeError("no training examples left to train on")
        self.num_rows, self.batch_size, self.seed, self.position = num_rows, min(batch_size, num_rows), seed, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.batch_size  # the last partial batch is left for the next epoch's shuffle

    def next(self) -> torch.Tensor:
        epoch, k = divmod(self.position, self.batches_per_epoch)
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        self.position += 1
        return order[k * self.batch_size:(k + 1) * self.batch_size]


def save_settings(out_dir: Path, file: str, base: Path, tokenizer_path: Path, cfg) -> None:
    """Record what a run started from (model folder, tokenizer file) and its config dataclass, so
    --resume needs only the run folder (read_settings)."""
    atomic_write_text(Path(out_dir) / file, json.dumps({"base": str(base), "tokenizer": str(tokenizer_path),
                                                        "config": asdict(cfg)}, indent=2))


def read_settings(out_dir: str | Path, file: str, what: str) -> tuple[Path, Path, dict]:
    """(model folder, tokenizer file, config as a dict) save_settings wrote in out_dir."""
    path = Path(out_dir) / file
    if not path.exists():
        raise LmforgeError(f"--resume: {path} not found; {out_dir} is not {what}")
    saved = json.loads(path.read_text())
    return Path(saved["base"]), Path(saved["tokenizer"]), saved["config"]


def load_settings(out_dir: str | Path, file: str, what: str, config_class):
    """(model folder, tokenizer file, config) for a stage whose config is a dataclass with a `fit` field
    and nothing else nested (dpo, reward-model)."""
    base, tokenizer_path, config = read_settings(out_dir, file, what)
    return base, tokenizer_path, config_class(**{**config, "fit": FitConfig(**config["fit"])})


@dataclass
class FitConfig:
    out_dir: str
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # rows (or pairs) per micro-batch
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 3e-4
    matrix_lr: float = 0.005  # Muon, when optimizer='muon'
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_frac: float = 0.0
    eval_every: int = 50
    ckpt_every: int = 200
    log_every: int = 5
    seed: int = 1337
    progress: bool = True


def _select(data: Batch, rows: torch.Tensor, device: torch.device) -> Batch:
    return {k: v[rows].to(device, non_blocking=True) for k, v in data.items()}


def fit(model: torch.nn.Module, train: Batch, val: Batch | None, loss_fn: LossFn, cfg: FitConfig, *,
        device: torch.device, dtype: torch.dtype, resume: bool = False, stage: str = "train") -> dict:
    """Train the parameters of `model` that require grad on `train` (tensors sharing a first
    dimension, e.g. inputs and targets); return a summary with the final held-out figures."""
    out_dir = Path(cfg.out_dir)
    num_rows = next(iter(train.values())).size(0)
    sampler = EpochSampler(num_rows, cfg.batch_size, cfg.seed)
    steps_per_epoch = max(1, sampler.batches_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizers = build_optimizers(model, name=cfg.optimizer, lr=cfg.lr, matrix_lr=cfg.matrix_lr,
                                  weight_decay=cfg.weight_decay, dtype=dtype)
    metrics_path = out_dir / "metrics.jsonl"
    step = 0
    if resume:
        ckpt, state = resume_checkpoint(out_dir, model, optimizers)  # past a broken latest, with a warning
        step, sampler.position = state["step"], state["sampler_position"]
        rewind_metrics(metrics_path, step)
        print0(f"resuming from {ckpt} (step {step})")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(metrics_path, "")
    atomic_write_text(out_dir / f"{stage}_config.json", json.dumps(asdict(cfg), indent=2))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def log(record: dict):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if val is None:
            return {}
        model.eval()
        sums: dict[str, float] = {}
        n = next(iter(val.values())).size(0)
        for start in range(0, n, cfg.batch_size):
            rows = torch.arange(start, min(n, start + cfg.batch_size))
            with autocast(device, dtype):
                loss, figures = loss_fn(model, _select(val, rows, device))
            for k, v in {"loss": loss, **figures}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(rows)
        model.train()
        result = {f"val_{k}": v / n for k, v in sums.items()}
        log({"step": step, **result})
        return result

    held_out = evaluate() if step == 0 else {}
    first_val = dict(held_out)
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, unit="step", dynamic_ncols=True, desc=stage)
    window: dict[str, float] = {}
    window_steps, t0 = 0, time.perf_counter()
    while step < total_steps:
        set_lr(optimizers, lr_multiplier(step, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                                         schedule=cfg.schedule, min_lr_frac=cfg.min_lr_frac))
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            with autocast(device, dtype):
                loss, figures = loss_fn(model, _select(train, sampler.next(), device))
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            for k, v in figures.items():
                window[k] = window.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip).item()
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            raise LmforgeError(f"{stage} diverged at step {step}: loss={loss_sum}, gradient norm={grad_norm}; the "
                               "weights were not updated with it. Lower --lr and start again")
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        window["loss"] = window.get("loss", 0.0) + loss_sum
        window_steps += 1
        if step % cfg.log_every == 0 or step == total_steps:
            record = {k: v / window_steps for k, v in window.items()}
            log({"step": step, **record, "grad_norm": grad_norm, "epoch": sampler.position / sampler.batches_per_epoch,
                 "steps_per_s": window_steps / (time.perf_counter() - t0)})
            bar.set_postfix({k: f"{v:.3f}" for k, v in {**record, **held_out}.items()}, refresh=False)
            window, window_steps, t0 = {}, 0, time.perf_counter()
        bar.update(1)
        if step % cfg.eval_every == 0 and step != total_steps:
            held_out = evaluate()
        if step % cfg.ckpt_every == 0 and step != total_steps:
            save_checkpoint(out_dir, step, model, optimizers, {"sampler_position": sampler.position},
                            trainable_only=True)
    bar.close()
    held_out = evaluate()
    save_checkpoint(out_dir, step, model, optimizers, {"sampler_position": sampler.position}, trainable_only=True)
    model.eval()
    return {"steps": step, "epochs": sampler.position / sampler.batches_per_epoch, "first": first_val,
            "final": held_out, "num_trainable": sum(p.numel() for p in trainable)}
