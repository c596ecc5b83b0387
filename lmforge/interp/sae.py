"""Sparse autoencoders on a model's activations: TopK SAEs, trained on streamed activations, measured,
and saved in SAELens's on-disk format.

A TopK SAE (Makhzani & Frey 2013; Gao et al. 2024, "Scaling and evaluating sparse autoencoders")
writes an activation x (d_in) as a sparse sum of learned directions:

    f     = TopK(W_enc^T (x - b_dec) + b_enc)        (d_sae,) with at most k non-zero, all >= 0
    x_hat = W_dec^T f + b_dec                         (d_in,)

trained on ||x - x_hat||^2 alone: sparsity is the TopK, so there is no L1 penalty to tune and no
shrinkage. Latents that stop firing ("dead": none of the last `dead_after_tokens` tokens chose them)
get a gradient from the auxiliary loss of Gao et al. section A.2: the k_aux largest pre-activations
among the dead latents reconstruct the main reconstruction's error e = x - x_hat, and
alpha * ||e - e_hat||^2 / ||e - mean(e)||^2 is added (alpha = 1/32, k_aux = d_in / 2, as there).
Decoder rows are kept at unit norm after every step (so a latent's activation is its size), and the
part of the gradient along them is removed first (Bricken et al. 2023).

Measured on held-out text (`evaluate_sae`): L0 (mean active latents per token), explained variance
1 - E||x - x_hat||^2 / E||x - E x||^2, the fraction of latents dead, and the CE loss recovered:
(CE with the activation zeroed - CE with x_hat spliced in) / (CE zeroed - CE clean), the share of
the model's next-token loss the reconstruction keeps (1 is perfect).

On disk it is SAELens's layout (`sae_lens.SAE.load_from_disk` reads it): `cfg.json` (architecture
"topk", d_in, d_sae, k, metadata with the hook name) and `sae_weights.safetensors` with W_enc
(d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,).

Shape legend: N tokens in a batch, d_in the activation width, d_sae the number of latents.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.common import LmforgeError

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# SINK_NOTE: the first position of every window is an attention sink (Xiao et al. 2023) whose residual
# stream is tens of times the norm of any other (SmolLM2: massive activations in a few dimensions,
# Sun et al. 2024). One such outlier in a batch dominates the squared error, so, as SAELens's
# training does for BOS, the SAE is trained and measured on positions 1 onwards; evaluation splices
# the reconstruction in there and leaves position 0 as the model computed it.
MAX_CFG_BYTES = 1 << 20


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, hook_name: str = "", model_name: str = ""):
        super().__init__()
        if not 0 < k <= d_sae:
            raise LmforgeError(f"SAE k={k} must be between 1 and d_sae={d_sae}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.hook_name, self.model_name = hook_name, model_name
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Unit-norm random decoder rows, encoder = its transpose (Gao et al. 2024, section 2.3)."""
        g = torch.Generator().manual_seed(seed)
        self.W_dec.copy_(nn.functional.normalize(torch.randn(self.d_sae, self.d_in, generator=g), dim=1))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc  # (..., d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_in) -> f (..., d_sae): the k largest pre-activations, ReLU'd; the rest 0."""
        pre = self.pre_acts(x)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec  # (..., d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- SAELens's on-disk format ------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        from lmforge.base import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / WEIGHTS_FILE))
        cfg = {"architecture": "topk", "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
               "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
               "metadata": {"model_name": self.model_name, "hook_name": self.hook_name,
                            "sae_lens_training_version": None, "trained_with": "lmforge"}}
        atomic_write_text(folder / CFG_FILE, json.dumps(cfg, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TopKSAE:
        """Read a TopK SAE saved by lmforge or SAELens; one-line errors for anything else."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
        if not cfg_path.is_file() or not weights_path.is_file():
            raise LmforgeError(f"{folder}: not an SAE folder (it needs {CFG_FILE} and {WEIGHTS_FILE})")
        if cfg_path.stat().st_size > MAX_CFG_BYTES:
            raise LmforgeError(f"{cfg_path}: larger than {MAX_CFG_BYTES:,} bytes; not an SAE config")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            d_in, d_sae, k = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
        except (ValueError, KeyError, TypeError) as e:
            raise LmforgeError(f"{cfg_path}: not a readable SAE config ({e})") from None
        if cfg.get("architecture") != "topk" or cfg.get("normalize_activations", "none") != "none":
            raise LmforgeError(f"{cfg_path}: architecture {cfg.get('architecture')!r} with normalisation "
                               f"{cfg.get('normalize_activations')!r}; lmforge reads TopK SAEs without normalisation")
        meta = cfg.get("metadata") or {}
        sae = cls(d_in, d_sae, k, hook_name=str(meta.get("hook_name") or ""),
                  model_name=str(meta.get("model_name") or ""))
        tensors = load_file(str(weights_path))
        expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        for name, shape in expected.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise LmforgeError(f"{weights_path}: {name} is {got}; cfg.json says {shape}")
        sae.load_state_dict({n: tensors[n].float() for n in expected})
        return sae


# ----------------------------------------------------------------------------- activations

def activation_batches(hooked, token_docs: Iterable[list[int]], hook_name: str, *, context: int = 128,
                       batch_docs: int = 8) -> Iterator[torch.Tensor]:
    """Stream the activations at hook_name, (N, d_in) per batch of `batch_docs` windows of `context`
    tokens, each window's first position left out (SINK_NOTE). Documents are cut into windows; the
    model runs only up to the hooked layer."""
    from lmforge.interp.hooks import layer_of

    layer = layer_of(hook_name)
    stop = layer + 1 if layer is not None else None
    windows: list[list[int]] = []
    device = hooked.model.lm_head.weight.device

    def run(rows):
        ids = torch.tensor(rows, device=device)
        with torch.no_grad():
            _, cache = hooked.run_with_cache(ids, names_filter=[hook_name], stop_at_layer=stop)
        acts = cache[hook_name][:, 1:]  # (B, context - 1, d_in): see SINK_NOTE
        return acts.reshape(-1, acts.size(-1)).float()

    for doc in token_docs:
        for start in range(0, len(doc) - context + 1, context):
            windows.append(doc[start:start + context])
            if len(windows) == batch_docs:
                yield run(windows)
                windows = []
    if windows:
        yield run(windows)


def shuffled(batches: Iterable[torch.Tensor], buffer_tokens: int, batch_tokens: int,
             seed: int = 0) -> Iterator[torch.Tensor]:
    """Mix activations from many documents: neighbouring tokens of one text are alike, and an SAE
    trained on them in order chases each document. Fill a buffer, shuffle it, hand out half, refill."""
    g = torch.Generator().manual_seed(seed)
    buffer = torch.empty(0)
    for batch in batches:
        buffer = torch.cat([buffer, batch]) if buffer.numel() else batch
        if buffer.size(0) >= buffer_tokens:
            buffer = buffer[torch.randperm(buffer.size(0), generator=g)]
            half = buffer.size(0) // 2
            for start in range(0, half - batch_tokens + 1, batch_tokens):
                yield buffer[start:start + batch_tokens]
            buffer = buffer[half - half % batch_tokens:]
    buffer = buffer[torch.randperm(buffer.size(0), generator=g)]
    for start in range(0, buffer.size(0) - batch_tokens + 1, batch_tokens):
        yield buffer[start:start + batch_tokens]


# ----------------------------------------------------------------------------- training

@dataclass
class SAETrainConfig:
    d_sae: int = 4096
    k: int = 32
    lr: float = 4e-4  # Adam, as Gao et al. (scaled for d_sae here)
    batch_tokens: int = 1024
    buffer_tokens: int = 16384
    aux_alpha: float = 1 / 32
    dead_after_tokens: int = 200_000  # Gao et al. use 10M on larger runs; scaled to a CPU budget
    seed: int = 0
    log: list = field(default_factory=list)


def aux_loss(sae: TopKSAE, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor,
             k_aux: int) -> torch.Tensor:
    """Gao et al. A.2: the dead latents' top k_aux pre-activations reconstruct the error x - x_hat."""
    num_dead = int(dead.sum())
    if num_dead == 0:
        return x.new_zeros(())
    error = (x - x_hat).detach()
    masked = pre.masked_fill(~dead, float("-inf"))
    values, indices = masked.topk(min(k_aux, num_dead), dim=-1)
    f_aux = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    e_hat = f_aux @ sae.W_dec
    return (e_hat - error).pow(2).sum(-1).mean() / error.sub(error.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)


def train_sae(sae: TopKSAE, batches: Iterable[torch.Tensor], config: SAETrainConfig, *, max_tokens: int,
              progress: bool = True) -> dict:
    """Train on (batch_tokens, d_in) batches until max_tokens; returns the last figures."""
    from tqdm import tqdm

    opt = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long)  # tokens since each latent was last chosen
    k_aux = max(1, sae.d_in // 2)
    seen, initialised = 0, False
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, disable=not progress, desc="SAE")
    stats = {"tokens": 0, "explained_variance": math.nan, "dead_fraction": math.nan}
    for x in batches:
        if not initialised:  # b_dec at the data's mean: the SAE starts from the centre of the cloud
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
            initialised = True
        pre = sae.pre_acts(x)
        values, indices = pre.topk(sae.k, dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        x_hat = sae.decode(f)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        fvu = mse / x.sub(x.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)  # fraction of variance unexplained
        dead = since_fired >= config.dead_after_tokens
        loss = fvu + config.aux_alpha * aux_loss(sae, x, x_hat, pre, dead, k_aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # no gradient along the unit-norm decoder rows, then renormalise them
            w = sae.W_dec
            w.grad -= (w.grad * w).sum(-1, keepdim=True) * w
            opt.step()
            w.copy_(nn.functional.normalize(w, dim=1))
        fired = torch.zeros(sae.d_sae, dtype=torch.bool)
        fired[indices.flatten()] = True
        since_fired = torch.where(fired, 0, since_fired + x.size(0))
        seen += x.size(0)
        stats = {"tokens": seen, "explained_variance": 1 - fvu.detach().item(),
                 "dead_fraction": float(dead.float().mean())}
        config.log.append(stats)
        bar.update(x.size(0))
        bar.set_postfix(ev=f"{stats['explained_variance']:.3f}", dead=f"{stats['dead_fraction']:.3f}")
        if seen >= max_tokens:
            break
    bar.close()
    return stats


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_sae(sae: TopKSAE, hooked, token_windows: list[list[int]], batch_docs: int = 8) -> dict:
    """L0, explained variance, dead fraction and CE loss recovered on held-out windows of tokens."""
    device = hooked.model.lm_head.weight.device
    name = sae.hook_name
    counts = torch.zeros(sae.d_sae, dtype=torch.long)
    sq_err = total_sq = l0 = n = 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_x2 = 0.0
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    num_targets = 0
    for start in range(0, len(token_windows), batch_docs):
        ids = torch.tensor(token_windows[start:start + batch_docs], device=device)
        targets = ids[:, 1:].reshape(-1)
        logits, cache = hooked.run_with_cache(ids, names_filter=[name])
        x = cache[name][:, 1:].float()  # (B, T - 1, d_in): SINK_NOTE
        f = sae.encode(x)
        x_hat = sae.decode(f)
        spliced = torch.cat([cache[name][:, :1], x_hat.to(cache[name].dtype)], dim=1)
        ablated = torch.cat([cache[name][:, :1], torch.zeros_like(x_hat).to(cache[name].dtype)], dim=1)
        counts += (f > 0).reshape(-1, sae.d_sae).sum(0).cpu()
        l0 += float((f > 0).sum())
        flat = x.reshape(-1, sae.d_in).double()
        sq_err += float((x_hat - x).double().pow(2).sum())
        sum_x += flat.sum(0).cpu()
        sum_x2 += float(flat.pow(2).sum())
        n += flat.size(0)

        def nll(out, targets=targets):
            return float(torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.size(-1)).float(), targets,
                                                           reduction="sum"))

        ce["clean"] += nll(logits)
        ce["sae"] += nll(hooked.run_with_hooks(ids, [(name, lambda a, hook, r=spliced: r)]))
        ce["zero"] += nll(hooked.run_with_hooks(ids, [(name, lambda a, hook, r=ablated: r)]))
        num_targets += targets.numel()
    total_sq = sum_x2 - float(sum_x.pow(2).sum()) / max(n, 1)  # sum ||x - mean||^2
    ce = {k: v / max(num_targets, 1) for k, v in ce.items()}
    gap = ce["zero"] - ce["clean"]
    return {"tokens": int(n), "l0": l0 / max(n, 1), "explained_variance": 1 - sq_err / max(total_sq, 1e-12),
            "dead_fraction": float((counts == 0).float().mean()), "ce_clean": ce["clean"], "ce_sae": ce["sae"],
            "ce_zero_ablation": ce["zero"],
            "ce_loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap > 0 else math.nan}
