"""Next tokens for a batch of sequences, each with its own sampling settings.

Per row, in order (vLLM's and Hugging Face's order):
    penalties     repetition (Keskar et al. 2019, CTRL: a seen token's logit divided by the penalty
                  if positive, multiplied if negative), presence and frequency (OpenAI's definition:
                  logit - frequency * count - presence * [count > 0], counts over the output)
    temperature   logits / T; T = 0 is greedy (argmax after penalties)
    top-k         keep the k largest (ties with the k-th kept)
    top-p         keep the fewest most likely tokens whose probability reaches p (Holtzman et al. 2019)
    min-p         keep tokens with probability >= min_p * the top token's (Nguyen et al. 2024)
Then one draw per row from the row's own generator, by the exponential race
argmax(p_i / E_i), E_i ~ Exp(1), which picks i with probability p_i: a seeded sequence gets the
same tokens whatever else shares its batch.

Log-probabilities reported back are the model's own (log-softmax of the raw logits), what
evaluation harnesses score, not the filtered sampling distribution.

Shape legend: B rows (sequences sampling this step), V vocab_size.
"""

from __future__ import annotations

import torch

from lmforge.engine.sequence import Sequence
from lmforge.generate import filter_logits


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits (B, V) with each row's repetition/presence/frequency penalties applied."""
    rows = [i for i, s in enumerate(seqs) if s.params.penalised]
    if not rows:
        return logits
    logits = logits.clone()
    V = logits.size(1)
    for i in rows:
        p = seqs[i].params
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(seqs[i].token_ids)), device=logits.device)
            seen = seen[seen < V]
            picked = logits[i, seen]
            logits[i, seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seqs[i].output_ids:
            counts = torch.bincount(torch.tensor(seqs[i].output_ids, device=logits.device), minlength=V)[:V]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One next token per row of logits (B, V) for seqs; returns (B,) int64."""
    logits = apply_penalties(logits, seqs)
    if all(s.params.greedy for s in seqs):
        return logits.argmax(dim=-1)
    greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
    V, dev = logits.size(1), logits.device
    temperature = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=dev)
    top_k = torch.tensor([min(s.params.top_k or V, V) for s in seqs], device=dev)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=dev)
    probs = filter_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)  # (B, V)
    race = torch.stack([torch.empty(V, device=dev).exponential_(generator=s.generator) for s in seqs])  # (B, V)
    drawn = (probs / race).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: (log-probability of the chosen token, [(token, log-probability)] of the k most likely)."""
    logprobs = logits.float().log_softmax(dim=-1)  # (B, V)
    picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    if k == 0:
        return [(lp, []) for lp in picked]
    values, ids = logprobs.topk(k, dim=-1)
    return [(lp, list(zip(i, v))) for lp, i, v in zip(picked, ids.tolist(), values.tolist())]
