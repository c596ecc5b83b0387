"""Text generation from a `Transformer`: a sampler, a KV-cached decode loop, and streaming text.

    filter_logits(logits, ...)   temperature, top-k, top-p, min-p cuts, settings per row (engine's too)
    sample_next(logits)          one next token per row: greedy, temperature, top-k, top-p
    generate(model, prompt_ids)  prefill the prompt once, then decode one token per step, yielding ids
    stream_text(tok, ids)        those ids as printable text pieces, cut at a stop string

The decode loop keeps keys and values in the model's `KVCache`, so each step costs one token's
forward pass instead of the whole sequence's (tests/test_generate.py checks it against a naive
full-recompute loop). Batched, paged serving belongs to the inference engine, not here.

Shape legend: B batch, V vocab_size.
"""

from __future__ import annotations

import codecs
from collections.abc import Collection, Iterable, Iterator

import torch

from lmforge.common import LmforgeError, autocast, kv_cache_dtype
from lmforge.model import KVCache, Transformer

# top-p compares a running sum of probabilities with p; rounding can leave tokens whose true mass
# reaches exactly p a hair short (0.5 + 0.3 -> 0.79999995 in fp32). Mass this close counts as reaching p.
TOP_P_SLACK = 1e-6


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise LmforgeError naming the flag when a sampling setting cannot work."""
    if not temperature >= 0:  # also catches NaN
        raise LmforgeError(f"--temperature {temperature}: must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise LmforgeError(f"--top-k {top_k}: must be at least 1, or left unset to keep every token")
    if top_p is not None and not 0 < top_p <= 1:
        raise LmforgeError(f"--top-p {top_p}: must be in (0, 1], e.g. 0.9; 1 keeps every token")


def check_prompt(prompt_ids: list[int], config) -> None:
    """Raise LmforgeError when a prompt cannot be continued: empty, filling the context, or holding
    ids outside the vocabulary (plain generation and the engine alike)."""
    context = config.max_position_embeddings
    if len(prompt_ids) == 0:
        raise LmforgeError("the prompt is empty (0 tokens); give at least one token, e.g. the tokenizer's bos_id")
    if len(prompt_ids) >= context:
        raise LmforgeError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}, "
                           f"leaving no room to generate; shorten the prompt to at most {context - 1} tokens")
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise LmforgeError(f"prompt token ids {bad[:5]} are outside the model's vocabulary "
                           f"0..{config.vocab_size - 1}; check that the tokenizer belongs to this model")


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p per row: (B, V) fp32 logits with cut tokens at -inf.

    temperature (B,) > 0; top_k (B,) int, V for no cut; top_p (B,) in (0, 1]; min_p (B,) in [0, 1].
    """
    logits = logits.float() / temperature[:, None]  # fp32: bf16 logits have too few bits for the tail
    V = logits.size(1)
    if (top_k < V).any():
        sorted_desc = logits.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(1, (top_k.clamp(1, V) - 1)[:, None])  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        outside = mass_before >= (top_p - TOP_P_SLACK)[:, None]  # the top token (mass_before 0) always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    if (min_p > 0).any():
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row of logits (B, V); returns (B,) int64.

    temperature 0 is greedy and ignores top_k/top_p. Otherwise the logits are divided by the
    temperature, cut to the top_k largest, then to the nucleus (Holtzman et al. 2019): the fewest
    most-likely tokens whose probability reaches top_p, never fewer than one.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    B, V = logits.shape

    def per_row(value):
        return torch.full((B,), value, device=logits.device)

    # The per-row filters the inference engine uses, with one setting for every row.
    cut = filter_logits(logits, per_row(temperature), per_row(min(top_k or V, V)), per_row(top_p or 1.0),
                        per_row(0.0))
    probs = cut.softmax(dim=-1)  # (B, V); the cut tokens have probability exactly 0
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model: Transformer, prompt_ids: list[int], *, max_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids: Collection[int] = (), device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32, num_tokens: int | None = None) -> Iterator[int]:
    """Yield up to max_tokens new token ids after prompt_ids, one at a time, for streaming.

    Generation ends after max_tokens, at a token in stop_ids (which is not yielded), or when the
    prompt plus the output fill the model's context. The same seed gives the same tokens; the
    sampler draws from its own torch.Generator, so the global RNG is left alone.
    `device` defaults to the model's; `dtype` is the autocast compute precision. `num_tokens`, the
    tokenizer's size where it is smaller than the model's embedding table (imported checkpoints pad
    the table to a round number), keeps the sampler to ids the tokenizer can write out.

    The arguments are checked here, at the call, so a mistake surfaces before the first token.
    """
    check_prompt(prompt_ids, model.config)
    if max_tokens < 0:
        raise LmforgeError(f"--max-tokens {max_tokens}: must be >= 0")
    check_sampling(temperature, top_k, top_p)
    if num_tokens is not None and not 0 < num_tokens <= model.config.vocab_size:
        raise LmforgeError(f"the tokenizer has {num_tokens} tokens but the model's vocabulary is "
                           f"{model.config.vocab_size}; check that the tokenizer belongs to this model")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return _decode(model, list(prompt_ids), max_tokens, temperature, top_k, top_p, seed, set(stop_ids),
                   device, dtype, num_tokens)


def _decode(model: Transformer, prompt_ids: list[int], max_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, seed: int | None, stop_ids: set[int],
            device: torch.device, dtype: torch.dtype, num_tokens: int | None) -> Iterator[int]:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # fresh entropy, without touching the global RNG
    else:
        generator.manual_seed(seed)
    # The context is full once prompt + output reach max_position_embeddings: the model has no
    # position for another token.
    num_new = min(max_tokens, model.config.max_position_embeddings - len(prompt_ids))
    cache_dtype = kv_cache_dtype(model, dtype)

    def forward(ids: torch.Tensor) -> int:  # ids (1, T): append to the cache, sample the next token
        # The modes are entered per step, never held across a `yield`: they are thread-wide, and
        # would otherwise leak into the caller's code while it consumes the stream.
        with torch.inference_mode(), autocast(device, dtype):
            last = torch.tensor([ids.size(1) - 1], device=device)  # only the last position's logits
            logits = model(ids, kv_cache=cache, logits_at=last)[:, -1, :num_tokens]  # (1, V) or fewer
            return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator).item()

    with torch.inference_mode():
        cache = KVCache(model.config, 1, len(prompt_ids) + num_new, device, cache_dtype)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T_prompt): one prefill pass
    for _ in range(num_new):
        token = forward(ids)
        if token in stop_ids:
            return
        yield token
        ids = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)


class TextStream:
    """Turns token ids into text pieces that are safe to print, and watches for stop strings.

    Token bytes go through an incremental UTF-8 decoder, so a character whose bytes are split
    across tokens comes out whole once its last byte arrives, never as U+FFFD halves. Text that
    could still be the start of a stop string is held back until the next tokens decide it; once a
    stop string appears, the output ends just before it and `stopped` becomes True.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = (), skip_ids: Iterable[int] = ()):
        """skip_ids: tokens that add no text (a server's skip_special_tokens)."""
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.skip_ids = frozenset(skip_ids)
        if any(s == "" for s in self.stop):
            raise LmforgeError("--stop '': an empty stop string would end generation at once; remove it")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded, not yet emitted: it might be the start of a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became printable ('' if none)."""
        if self.stopped or token_id in self.skip_ids:
            return ""
        self._pending += self._decoder.decode(self.tokenizer.id_to_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: return whatever was held back (a partial stop string is just text)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._pending
        # The stop string that completes first wins, as if text arrived one character at a time, so
        # where output ends does not depend on how the text was cut into tokens.
        hits = [(i + len(s), i) for s in self.stop if (i := text.find(s)) >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[:min(hits)[1]]
        # Hold the longest tail that some stop string starts with. Emitted text never holds a stop
        # string's start, so a stop string spanning several tokens is always found whole in _pending.
        held = 0 if final else max((n for s in self.stop for n in range(1, min(len(s), len(text) + 1))
                                    if text.endswith(s[:n])), default=0)
        self._pending = text[len(text) - held:]
        return text[:len(text) - held]


def stream_text(tokenizer, token_iter: Iterable[int], stop: Iterable[str] = (),
                skip_special: bool = True) -> Iterator[str]:
    """Yield text pieces for token_iter as they become printable; stop pulling tokens at a stop string.
    Special tokens (chat markers, padding) add no text unless skip_special is False.

    With `generate` as token_iter, ending here ends generation: no token is computed after the stop.
    """
    stream = TextStream(tokenizer, stop, getattr(tokenizer, "special_ids", {}).values() if skip_special else ())
    for token_id in token_iter:
        piece = stream.push(token_id)
        if piece:
            yield piece
        if stream.stopped:
            return
    tail = stream.finish()
    if tail:
        yield tail
