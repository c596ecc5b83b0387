"""Pretraining: the forward/backward loop, on one CPU or GPU or many through torchrun (DDP).

    lmforge pretrain --data runs/x/data --out runs/x            # one process
    torchrun --nproc_per_node 4 -m lmforge.cli pretrain ...     # DDP: gloo on CPU, NCCL on GPU

One step = grad_accum micro-batches per rank, gradients averaged over ranks (DDP) and micro-
batches, clipped, then the optimizers step at the scheduled learning rate. Everything a resumed
run needs (weights, optimizer tensors, loader position, step, schedule length, RNG) is in the
checkpoint, so `--resume` continues with exactly the losses an uninterrupted run would have seen;
it resumes from the newest good checkpoint (past a broken `latest`, with a warning) and rewinds
metrics.jsonl to its step (a cut last line, left by a kill mid-write, is dropped and counted).

A wall-clock budget (`--minutes`) is turned into a fixed step count after timing the first
steps; that count is saved, so the schedule (and a resume) does not depend on the clock again.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm import tqdm

from lmforge.base import rewind_metrics
from lmforge.checkpoint import TOKENIZER_FILE, latest_checkpoint, resume_checkpoint, save_checkpoint, save_model_folder
from lmforge.common import (
    LmforgeError,
    atomic_write_bytes,
    atomic_write_text,
    autocast,
    init_distributed,
    matmul_flops_per_s,
    print0,
    resolve_dtype,
    seed_everything,
)
from lmforge.data import DataLoader, TokenStream, read_meta
from lmforge.evaluate import evaluate_bpb
from lmforge.model import ModelConfig, Transformer
from lmforge.optim import build_optimizers, lr_multiplier, set_lr


@dataclass
class TrainConfig:
    data_dir: str
    out_dir: str
    # model: one depth dial (width = depth * aspect_ratio), see ModelConfig.from_depth
    depth: int = 4
    aspect_ratio: int = 64
    head_dim: int = 64
    kv_group: int = 1
    tie_embeddings: bool = True
    seq_len: int = 256
    # batch: global batch = batch_size * grad_accum * world_size sequences
    batch_size: int = 16
    grad_accum: int = 1
    # optimisation
    optimizer: str = "muon"
    lr: float = 3e-3  # AdamW (all of the model with adamw; embedding, head and gains with muon)
    matrix_lr: float = 0.02  # Muon, hidden matrices
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: str = "wsd"
    warmup_steps: int = 50
    decay_frac: float = 0.4
    min_lr_frac: float = 0.0
    # length: a step count, or a wall-clock budget converted to one after timing
    max_steps: int | None = None
    time_budget_s: float | None = None
    # machinery
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = 1337
    eval_every: int = 250
    eval_tokens: int = 65536
    ckpt_every: int = 1000
    log_every: int = 10
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form facts recorded with the run (e.g. the recipe)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig.from_depth(self.depth, vocab_size, self.seq_len, head_dim=self.head_dim,
                                      kv_group=self.kv_group, aspect_ratio=self.aspect_ratio,
                                      tie_word_embeddings=self.tie_embeddings)


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.
    Swaps the layers' forward from outside, so parameter names and the model file are untouched."""
    for layer in model.blocks:
        forward = layer.forward
        layer.forward = lambda *args, _f=forward: activation_checkpoint(_f, *args, use_reentrant=False)


def pretrain(cfg: TrainConfig, *, resume: bool = False) -> dict:
    if (cfg.max_steps is None) == (cfg.time_budget_s is None):
        raise LmforgeError("give exactly one of --steps or --minutes")
    ddp = init_distributed(cfg.device)
    device, dtype = ddp.device, resolve_dtype(cfg.dtype, ddp.device)
    out_dir = Path(cfg.out_dir)
    meta = read_meta(cfg.data_dir)
    seed_everything(cfg.seed)

    model = Transformer(cfg.model_config(meta["vocab_size"]))
    model.init_weights(seed=cfg.seed)
    model.to(device)
    optimizers = build_optimizers(model, name=cfg.optimizer, lr=cfg.lr, matrix_lr=cfg.matrix_lr,
                                  weight_decay=cfg.weight_decay, dtype=dtype)
    loader = DataLoader(TokenStream(cfg.data_dir, "train"), cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                        rank=ddp.rank, world_size=ddp.world_size, device=device)
    val_tokens = TokenStream(cfg.data_dir, "val").all()
    token_bytes = torch.tensor(meta["token_bytes"], dtype=torch.int64)

    step, total_steps, elapsed_before = 0, cfg.max_steps, 0.0
    metrics_path = out_dir / "metrics.jsonl"
    if resume:
        ckpt, state = resume_checkpoint(out_dir, model, optimizers)  # past a broken latest, with a warning
        loader.load_state_dict(state["loader"])
        step, total_steps, elapsed_before = state["step"], state["total_steps"], state["elapsed_s"]
        print0(f"resuming from {ckpt} (step {step})")
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(asdict(cfg), indent=2))
        atomic_write_bytes(out_dir / TOKENIZER_FILE, (Path(cfg.data_dir) / TOKENIZER_FILE).read_bytes())
        if resume:
            rewind_metrics(metrics_path, step)  # what came after the checkpoint is logged again
        else:
            atomic_write_text(metrics_path, "")

    raw_model = model
    if cfg.grad_checkpointing:
        enable_activation_checkpointing(raw_model)
    if cfg.compile:
        model = torch.compile(model)
    if ddp.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ddp.world_size
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    # MFU denominator, measured here in the dtype the matmuls run in: bf16 matmuls on a CPU with AMX or
    # AVX-512 BF16 run ~4x fp32's rate, and an fp32 peak would report over 100%
    peak_flops = matmul_flops_per_s(device, dtype) * ddp.world_size
    print0(f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(True) / 1e6:.2f}M "
           f"without embeddings), {flops_per_token / 1e6:.1f} MFLOP/token; {ddp.world_size} process(es) on "
           f"{device.type}, {str(dtype).removeprefix('torch.')}, {tokens_per_step:,} tokens/step; "
           f"{len(loader.stream):,} train / {len(val_tokens):,} held-out tokens")

    def log(record: dict):
        if ddp.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate() -> float:
        result = evaluate_bpb(raw_model, val_tokens, token_bytes, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                              device=device, dtype=dtype, max_tokens=cfg.eval_tokens)
        log({"step": step, "val_bpb": result["bpb"]})
        return result["bpb"]

    def checkpoint_state() -> dict:
        return {"loader": loader.state_dict(), "total_steps": total_steps, "elapsed_s": elapsed_s,
                "train_config": asdict(cfg)}

    # Calibration for a wall-clock budget: time steps [CALIB_FROM, CALIB_TO) (the first ones pay
    # for allocation warm-up) and plan the step count. With WSD the plan is timed again a quarter
    # of the way in, still inside the flat phase whose learning rate does not depend on the total,
    # so a slow or noisy first measurement does not waste (or overrun) the budget.
    CALIB_FROM, CALIB_TO = 3, 15
    replan_step = None
    t_start = time.perf_counter() - elapsed_before
    eval_seconds = 0.0

    def plan(seconds_per_step: float) -> int:
        remaining = cfg.time_budget_s - (time.perf_counter() - t_start) - eval_seconds  # the final eval
        planned = torch.tensor(step + max(0, int(remaining / seconds_per_step)), device=device)
        if ddp.distributed:
            dist.broadcast(planned, src=0)  # every rank must run the same number of steps
        return int(planned)

    val_bpb = float("nan")
    if step == 0:
        t0 = time.perf_counter()
        val_bpb = evaluate()
        eval_seconds = time.perf_counter() - t0
    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and ddp.is_main), unit="step",
               dynamic_ncols=True)
    elapsed_s = time.perf_counter() - t_start
    window_t0, window_tokens, calib_t0 = time.perf_counter(), 0, None
    loss_value = float("nan")
    try:
        while total_steps is None or step < total_steps:
            if step == CALIB_FROM:
                calib_t0 = time.perf_counter()
            mult = lr_multiplier(step, total_steps=total_steps or 10**9, warmup_steps=cfg.warmup_steps,
                                 schedule=cfg.schedule, decay_frac=cfg.decay_frac, min_lr_frac=cfg.min_lr_frac)
            set_lr(optimizers, mult)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = loader.next_batch()
                last = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last or not ddp.distributed else model.no_sync()
                with sync:
                    with autocast(device, dtype):
                        loss = model(x, y) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            if ddp.distributed:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            loss_value = loss_sum.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip).item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                last_ckpt = latest_checkpoint(out_dir)
                raise LmforgeError(
                    f"training diverged at step {step}: loss={loss_value}, gradient norm={grad_norm}. The weights "
                    f"were not updated with it. Lower --lr/--matrix-lr or raise --warmup-steps, then start again"
                    + (f" or --resume from {last_ckpt}" if last_ckpt else ""))
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            window_tokens += tokens_per_step

            if total_steps is None and step == CALIB_TO:
                seconds_per_step = (time.perf_counter() - calib_t0) / (CALIB_TO - CALIB_FROM)
                seconds_per_step += eval_seconds / cfg.eval_every  # periodic evals share the budget
                total_steps = bar.total = plan(seconds_per_step)
                if cfg.schedule == "wsd":
                    replan_step = max(CALIB_TO + 1, total_steps // 4)
                print0(f"\ntimed {seconds_per_step:.3f} s/step: {total_steps} steps fit in the budget")
            elif step == replan_step:
                # everything since calibration, evals and checkpoints included
                seconds_per_step = (time.perf_counter() - calib_t0) / (step - CALIB_FROM)
                total_steps = bar.total = plan(seconds_per_step)

            elapsed_s = time.perf_counter() - t_start
            if step % cfg.log_every == 0 or step == total_steps:
                dt = time.perf_counter() - window_t0
                tokens_per_s = window_tokens / dt
                mfu = flops_per_token * tokens_per_s / peak_flops
                log({"step": step, "tokens": step * tokens_per_step, "loss": loss_value, "lr_mult": mult,
                     "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": elapsed_s})
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{100 * mfu:.1f}%",
                                bpb=f"{val_bpb:.3f}", refresh=False)
                window_t0, window_tokens = time.perf_counter(), 0
            bar.update(1)
            if step % cfg.eval_every == 0 and step != total_steps:
                val_bpb = evaluate()
            if step % cfg.ckpt_every == 0 and step != total_steps and ddp.is_main:
                save_checkpoint(out_dir, step, raw_model, optimizers, checkpoint_state())
    except KeyboardInterrupt:
        if ddp.is_main and step > 0:
            folder = save_checkpoint(out_dir, step, raw_model, optimizers, checkpoint_state())
            raise LmforgeError(f"interrupted at step {step}; saved {folder}. Continue with --resume") from None
        raise
    finally:
        bar.close()

    val_bpb = evaluate()
    if ddp.is_main:
        save_checkpoint(out_dir, step, raw_model, optimizers, checkpoint_state())
        from lmforge.tokenizer import Tokenizer

        save_model_folder(out_dir / "model", raw_model, Tokenizer.load(out_dir / TOKENIZER_FILE),
                          extra={"step": step, "tokens": step * tokens_per_step, "val_bpb": val_bpb})
    elapsed_s = time.perf_counter() - t_start
    summary = {"steps": step, "tokens": step * tokens_per_step, "elapsed_s": elapsed_s,
               "tokens_per_s": step * tokens_per_step / max(elapsed_s, 1e-9), "final_loss": loss_value,
               "val_bpb": val_bpb, "num_params": raw_model.num_params(), "world_size": ddp.world_size,
               "dtype": str(dtype).removeprefix("torch.")}
    summary["mfu"] = flops_per_token * summary["tokens_per_s"] / peak_flops
    return summary
