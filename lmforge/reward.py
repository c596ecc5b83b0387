"""`lmforge reward-model`: a Bradley-Terry reward model trained on preference pairs.

    lmforge reward-model --run runs/chat --data prefs.jsonl --out runs/rm

The model is the language model's body with a scalar head in place of the vocabulary: the reward
of a conversation is `score(h)`, h the final hidden state at its last token (the assistant's end
of turn), the way Hugging Face's LlamaForSequenceClassification scores a sequence (its head is
also named `score`). Trained with the Bradley-Terry likelihood (Bradley & Terry 1952; as in
InstructGPT, Ouyang et al. 2022): P(chosen beats rejected) = sigmoid(r_chosen - r_rejected), so

    loss = -log sigmoid(r(x, y_w) - r(x, y_l))

and held-out accuracy is how often the chosen answer scores higher.

The output folder holds `model/` (the body, still a loadable language model) and
`reward_head.safetensors` (score.weight, (1, D)); `load_reward_model` puts them together.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import load_model, save_model_folder
from lmforge.common import LmforgeError, atomic_write_text, get_device, resolve_dtype, seed_everything
from lmforge.conversations import pad_token_id
from lmforge.dpo import pair_tensors, read_pair_splits
from lmforge.posttrain import FitConfig, fit, load_settings, save_settings
from lmforge.tokenizer import load_tokenizer

HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """A language model's body plus a scalar head: (B, T) token ids -> (B,) rewards."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.score = nn.Linear(body.config.hidden_size, 1, bias=False)
        self.config = body.config
        body.lm_head.requires_grad_(False)  # tied to the embedding or not, the vocabulary head is unused here
        if body.config.tie_word_embeddings:
            body.model.embed_tokens.weight.requires_grad_(True)  # the tie made it frozen too; the body still trains

    def forward(self, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), last (B,) index of each row's final real token."""
        hidden = self.body.hidden_states(input_ids)  # (B, T, D)
        at = hidden[torch.arange(input_ids.size(0), device=input_ids.device), last]  # (B, D)
        return self.score(at).squeeze(-1).float()


def last_positions(targets: torch.Tensor) -> torch.Tensor:
    """Index of the input position whose target is each row's final trained token (the end of turn):
    the input row there ends with the token before it, so we read one further, where that token sits."""
    T = targets.size(1)
    idx = torch.arange(T, device=targets.device).expand_as(targets)
    return torch.where(targets >= 0, idx, -1).amax(1) + 1  # input position holding the end-of-turn token


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), {"accuracy": (margin > 0).float().mean(), "margin": margin.mean().detach()}


def with_last_token(data: dict, pad: int) -> dict:
    """The rows as scored: inputs extended by one column so the end-of-turn token itself is an input."""
    out = {}
    for side in ("chosen", "rejected"):
        inputs, targets = data[f"{side}_inputs"], data[f"{side}_targets"]
        last = last_positions(targets)
        extended = F.pad(inputs, (0, 1), value=pad)
        extended[torch.arange(inputs.size(0)), last] = targets.gather(1, (last - 1)[:, None]).squeeze(1)
        out[f"{side}_inputs"], out[f"{side}_last"] = extended, last
    return out


def reward_loss(model: RewardModel, batch: dict):
    B = batch["chosen_inputs"].size(0)
    rewards = model(torch.cat([batch["chosen_inputs"], batch["rejected_inputs"]]),
                    torch.cat([batch["chosen_last"], batch["rejected_last"]]))
    return bradley_terry_loss(rewards[:B], rewards[B:])


@dataclass
class RewardConfig:
    data: str
    val_data: str | None = None
    val_fraction: float = 0.1
    seq_len: int | None = None
    on_bad_line: str = "skip"
    device: str = "auto"
    dtype: str = "auto"
    fit: FitConfig = field(default_factory=lambda: FitConfig(out_dir="runs/rm", lr=1e-4, epochs=1.0))


SETTINGS_FILE = "reward_settings.json"  # what --resume restores


def load_reward_settings(out_dir: str | Path) -> tuple[Path, Path, RewardConfig]:
    """(starting model folder, tokenizer file, settings) a reward-model run was started with, for --resume."""
    return load_settings(out_dir, SETTINGS_FILE, "a reward-model run folder", RewardConfig)


def train_reward_model(folder: Path, tokenizer_path: Path, cfg: RewardConfig, *, resume: bool = False) -> dict:
    """Train a reward model from the model in `folder`; resume continues cfg.fit.out_dir's latest checkpoint."""
    seed_everything(cfg.fit.seed)
    device = get_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(tokenizer_path)
    pairs, val_pairs, bad_lines = read_pair_splits(cfg.data, cfg.val_data, cfg.val_fraction, cfg.on_bad_line)
    body = load_model(folder, device, dtype=torch.float32)
    context = cfg.seq_len or min(body.config.max_position_embeddings, 1024)
    counts: dict = {"train_pairs": len(pairs), "val_pairs": len(val_pairs), "bad_lines": bad_lines}
    pad = pad_token_id(tokenizer)
    train = pair_tensors(tokenizer, pairs, context - 1, counts)  # one column is added for the last token
    val = pair_tensors(tokenizer, val_pairs, context - 1, counts, "val_")
    if not train:
        raise LmforgeError(f"no preference pair fits in {context} tokens; raise --seq-len")
    train, val = with_last_token(train, pad), (with_last_token(val, pad) if val else None)
    model = RewardModel(body).to(device)
    torch.nn.init.normal_(model.score.weight, std=1 / (body.config.hidden_size + 1) ** 0.5)
    out = Path(cfg.fit.out_dir)
    if not resume:
        save_settings(out, SETTINGS_FILE, folder, tokenizer_path, cfg)
    summary = fit(model, train, val, reward_loss, cfg.fit, device=device, dtype=dtype, resume=resume, stage="reward")
    save_model_folder(out / "model", body, tokenizer)
    save_file({"score.weight": model.score.weight.detach().cpu().contiguous()}, out / HEAD_FILE)
    summary.update(counts=counts, base=str(folder), config=asdict(cfg))
    atomic_write_text(out / "reward.json", json.dumps(summary, indent=2))
    return summary


def load_reward_model(out_dir: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    out_dir = Path(out_dir)
    if not (out_dir / HEAD_FILE).exists():
        raise LmforgeError(f"{out_dir}: no {HEAD_FILE}; this is not a reward-model folder (lmforge reward-model)")
    model = RewardModel(load_model(out_dir / "model", device, dtype=torch.float32))
    model.score.weight.data.copy_(load_file(out_dir / HEAD_FILE)["score.weight"])
    return model.to(device).eval()
