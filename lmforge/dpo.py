"""`lmforge dpo`: Direct Preference Optimisation (Rafailov et al. 2023) against a frozen reference.

    lmforge dpo --run runs/chat --data prefs.jsonl --out runs/dpo          # {"prompt", "chosen", "rejected"}
    lmforge dpo --run runs/chat --from-feedback --out runs/dpo             # the server's stored feedback

--from-feedback writes the pairs feedback.py makes from the server's feedback to a JSONL file
(OUT/feedback_pairs.jsonl, or --write-pairs) and trains on that file exactly as on --data.

For a prompt x with a preferred answer y_w and a rejected one y_l, the policy pi is trained to
raise the log-likelihood ratio of y_w over y_l relative to the reference model pi_ref (the
starting weights, frozen):

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

beta * (log pi - log pi_ref) is the answer's implicit reward; the reported reward accuracy is how
often the chosen answer's implicit reward beats the rejected one's, and the margin is their
difference. Log-likelihoods are summed over the answer's tokens only (its end-of-turn token
included), rendered through the chat template exactly as SFT renders them.

The reference's log-likelihoods are computed once, before training, by a separate frozen copy of
the starting model that is then released: no second model stays in memory during training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_model, save_model_folder
from lmforge.common import LmforgeError, atomic_write_text, autocast, get_device, print0, resolve_dtype, seed_everything
from lmforge.conversations import Preference, held_out, pad_token_id, read_preferences, render
from lmforge.posttrain import FitConfig, fit, load_settings, pad_rows, save_settings
from lmforge.tokenizer import load_tokenizer


def pair_examples(tokenizer, pairs: list[Preference]) -> list[tuple[tuple[list[int], list[bool]], ...]]:
    """(chosen, rejected) renderings of each pair: (ids, trained) each."""
    return [tuple(render(tokenizer, [*p.prompt, {"role": "assistant", "content": answer}])
                  for answer in (p.chosen, p.rejected)) for p in pairs]


def pair_tensors(tokenizer, pairs: list[Preference], context: int, counts: dict, prefix: str = "") -> dict:
    """{chosen,rejected}_{inputs,targets} for the pairs whose both renderings fit the context; the rest
    are counted in counts[prefix + 'too_long_dropped']."""
    kept = [(c, r) for c, r in pair_examples(tokenizer, pairs) if max(len(c[0]), len(r[0])) <= context + 1]
    counts[prefix + "too_long_dropped"] = len(pairs) - len(kept)
    if not kept:
        return {}
    pad = pad_token_id(tokenizer)
    chosen_inputs, chosen_targets = pad_rows([c for c, _ in kept], pad)
    rejected_inputs, rejected_targets = pad_rows([r for _, r in kept], pad)
    T = max(chosen_inputs.size(1), rejected_inputs.size(1))  # one width for both, so they share a forward pass

    def widen(x, value):
        return F.pad(x, (0, T - x.size(1)), value=value)
    return {"chosen_inputs": widen(chosen_inputs, pad), "chosen_targets": widen(chosen_targets, -1),
            "rejected_inputs": widen(rejected_inputs, pad), "rejected_targets": widen(rejected_targets, -1)}


def sequence_logps(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over each row's trained tokens: (N,) fp32."""
    return -model(inputs, targets, loss_reduction="none").float().sum(1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over the pairs, with the implicit rewards' accuracy and margin."""
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    margin = reward_chosen - reward_rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_accuracy": (margin > 0).float().mean(), "reward_margin": margin.mean().detach(),
                  "reward_chosen": reward_chosen.mean().detach(), "reward_rejected": reward_rejected.mean().detach()}


def both_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy log-likelihoods of the chosen and rejected answers, in one forward pass of 2B rows."""
    inputs = torch.cat([batch["chosen_inputs"], batch["rejected_inputs"]])
    targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
    logps = sequence_logps(model, inputs, targets)
    return logps.chunk(2)


@torch.no_grad()
def add_reference_logps(reference, data: dict, *, batch_size: int, device, dtype) -> None:
    """Fill data['ref_chosen'/'ref_rejected'] with the frozen reference's log-likelihoods."""
    reference.eval()
    n = data["chosen_inputs"].size(0)
    chosen, rejected = [], []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in data.items()}
        with autocast(device, dtype):
            c, r = both_logps(reference, batch)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    data["ref_chosen"], data["ref_rejected"] = torch.cat(chosen), torch.cat(rejected)


@dataclass
class DPOConfig:
    data: str
    val_data: str | None = None
    val_fraction: float = 0.1
    beta: float = 0.1
    seq_len: int | None = None  # longest pair kept (prompt + answer); default: the model's context, at most 1024
    on_bad_line: str = "skip"
    device: str = "auto"
    dtype: str = "auto"
    fit: FitConfig = field(default_factory=lambda: FitConfig(out_dir="runs/dpo", lr=5e-5, epochs=1.0))


def read_pair_splits(data: str, val_data: str | None, val_fraction: float,
                     on_bad_line: str) -> tuple[list[Preference], list[Preference], dict]:
    """Training and held-out pairs: `val_data`, else a slice of `data` by a hash of the prompt (so one
    prompt's pairs stay on one side); each file's report printed. Returns the bad-line counts too."""
    pairs, report = read_preferences(data, on_error=on_bad_line)
    print0(report.summary())
    if val_data:
        val_pairs, val_report = read_preferences(val_data, on_error=on_bad_line)
        print0(val_report.summary())
    else:
        is_val = [held_out(p.prompt, val_fraction) for p in pairs]
        val_pairs = [p for p, v in zip(pairs, is_val) if v]
        pairs = [p for p, v in zip(pairs, is_val) if not v]
        if not pairs:
            raise LmforgeError(f"all {len(val_pairs):,} pairs in {data} fell in the held-out slice (it is chosen by "
                               "prompt); add pairs with other prompts, or give --val-data")
    return pairs, val_pairs, dict(report.skipped)


SETTINGS_FILE = "dpo_settings.json"  # what --resume restores


def load_dpo_settings(out_dir: str | Path) -> tuple[Path, Path, DPOConfig]:
    """(starting model folder, tokenizer file, settings) a DPO run was started with, for --resume."""
    return load_settings(out_dir, SETTINGS_FILE, "a DPO run folder", DPOConfig)


def dpo(folder: Path, tokenizer_path: Path, cfg: DPOConfig, *, resume: bool = False) -> dict:
    """Train the model in `folder` with DPO; write cfg.fit.out_dir/model and dpo.json. resume continues
    cfg.fit.out_dir's latest checkpoint (the reference log-likelihoods are computed again, from the
    same starting model, so they are the same)."""
    if cfg.beta <= 0:
        raise LmforgeError(f"--beta {cfg.beta}: must be positive (0.1 is the usual choice)")
    seed_everything(cfg.fit.seed)
    device = get_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(tokenizer_path)
    pairs, val_pairs, bad_lines = read_pair_splits(cfg.data, cfg.val_data, cfg.val_fraction, cfg.on_bad_line)

    reference = load_model(folder, device)
    reference.requires_grad_(False)
    context = cfg.seq_len or min(reference.config.max_position_embeddings, 1024)
    counts: dict = {"train_pairs": len(pairs), "val_pairs": len(val_pairs), "bad_lines": bad_lines}
    train = pair_tensors(tokenizer, pairs, context, counts)
    val = pair_tensors(tokenizer, val_pairs, context, counts, "val_") or None
    if not train:
        raise LmforgeError(f"no preference pair fits in {context} tokens; raise --seq-len")
    for data in (train, val):
        if data:
            add_reference_logps(reference, data, batch_size=cfg.fit.batch_size, device=device, dtype=dtype)
    del reference
    print0(f"{train['chosen_inputs'].size(0):,} training pairs, {0 if val is None else val['chosen_inputs'].size(0):,}"
           f" held out; {counts['too_long_dropped'] + counts['val_too_long_dropped']} longer than {context} tokens "
           "dropped; reference log-likelihoods computed")

    policy = load_model(folder, device, dtype=torch.float32)

    def loss_fn(model, batch):
        chosen, rejected = both_logps(model, batch)
        return dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], cfg.beta)

    out = Path(cfg.fit.out_dir)
    if not resume:
        save_settings(out, SETTINGS_FILE, folder, tokenizer_path, cfg)
    summary = fit(policy, train, val, loss_fn, cfg.fit, device=device, dtype=dtype, resume=resume, stage="dpo")
    summary.update(counts=counts, beta=cfg.beta, base=str(folder), config=asdict(cfg))
    save_model_folder(out / "model", policy, tokenizer, extra={"dpo": {k: summary[k] for k in ("steps", "final")}})
    atomic_write_text(out / "dpo.json", json.dumps(summary, indent=2))
    return summary
