"""What the engine knows of one request: its sampling settings and its sequence of tokens.

A sequence is a list of token ids (prompt, then output) of which the first `num_computed` have
keys and values in the paged KV cache. Every engine step computes some of the rest: a chunk of a
prompt, or the one token sampled last step. When a step computes up to the last token, the model's
logits there pick the next token. A preempted sequence simply drops its cache and starts counting
from zero again (recompute), so prefill, chunked prefill, decode and recovery are one rule.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from lmforge.common import LmforgeError


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop. The defaults are OpenAI's."""
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # keep the k most likely tokens (ties with the k-th kept)
    top_p: float = 1.0  # nucleus: the fewest most likely tokens whose mass reaches p
    min_p: float = 0.0  # drop tokens below min_p times the most likely one's probability
    repetition_penalty: float = 1.0  # CTRL / HF: logits of seen tokens (prompt + output) divided (>0) or multiplied
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    seed: int | None = None  # same seed, same tokens, whatever else shares the batch
    stop: list[str] = field(default_factory=list)  # text stops (need the engine's tokenizer)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # independent completions of the prompt
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (scoring, `echo`)
    skip_special_tokens: bool = True  # special tokens (chat markers, ...) count but add no text (vLLM's default)

    def validate(self, vocab_size: int) -> None:
        """Raise LmforgeError naming the field whose value cannot work."""
        checks = [
            ("max_tokens", self.max_tokens >= 0, "must be >= 0"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k is None or self.top_k >= 1, "must be >= 1, or null for no cut"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 is none)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("n", 1 <= self.n <= 128, "must be in [1, 128]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= min(20, vocab_size),
             f"must be in [0, {min(20, vocab_size)}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= min(20, vocab_size),
             f"must be in [0, {min(20, vocab_size)}]"),
            ("stop_token_ids", all(0 <= t < vocab_size for t in self.stop_token_ids),
             f"must be token ids in 0..{vocab_size - 1}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("seed", self.seed is None or -2**63 <= self.seed < 2**63, "must be a 64-bit integer"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise LmforgeError(f"{name}={getattr(self, name)!r}: {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One completion being generated: tokens, cache blocks, sampling state, and what it produced."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                 index: int = 0, salt: bytes = b"", generator: torch.Generator | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.index = index  # which of its request's n completions
        self.token_ids = list(prompt_ids)  # prompt, then output
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.salt = salt  # the tenant's: prefix-cache hits only among sequences with the same salt
        self.generator = generator  # this sequence's own RNG: seeded output is independent of the batch
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose keys/values are in the cache
        self.num_cached_prompt_tokens: int | None = None  # prompt tokens found in the prefix cache (usage)
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.output_logprobs: list[tuple[float, list[tuple[int, float]]]] = []  # per output token
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = []  # per prompt token
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def in_prefill(self) -> bool:
        """Still computing prompt tokens (prompt logits may be wanted)."""
        return self.num_computed < self.num_prompt_tokens
