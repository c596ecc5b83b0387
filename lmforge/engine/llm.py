"""The engine's face: `LLM(model).generate(prompts, SamplingParams(...))`, speaking token ids.

    llm = LLM.from_folder("models/smollm")                   # or LLM(model, tokenizer)
    outs = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=20, temperature=0))
    outs[0].token_ids, outs[0].text

For serving, the loop is driven step by step: `add_request` queues a prompt, `step` runs one
scheduled batch and returns what every request gained (new tokens, new text, whether it ended),
`abort` drops a request and frees its blocks at once.

A step: the scheduler picks (sequence, new tokens) pairs; the model runner computes them into the
paged cache and returns logits at the rows that need them (each sequence's last token once its
prompt is in, and every prompt position for sequences that asked for prompt log-probabilities);
the sampler picks one token per finished row; stops and lengths are checked; full blocks are named
for the prefix cache.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.common import LmforgeError, get_device, kv_cache_dtype
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.model_runner import ModelRunner, PagedKVCache
from lmforge.engine.sampler import sample, top_logprobs
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.sequence import SamplingParams, Sequence
from lmforge.generate import TextStream, check_prompt

log = logging.getLogger(__name__)
Logprob = tuple[float, list[tuple[int, float]]]  # (chosen token's log-probability, [(token, lp)] top k)


@dataclass
class RequestOutput:
    """What one completion (one of a request's n) gained in a step, and its totals so far."""
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # new this step
    text: str  # new printable text this step ('' without a tokenizer)
    logprobs: list[Logprob]  # one per new token, when asked for
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", or "error" (this request failed; see error)
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    prompt_logprobs: list[Logprob | None] | None = None  # with the first output, when asked for
    error: str | None = None  # with finish_reason "error": what went wrong (the other requests go on)


@dataclass
class Completion:
    """A finished completion, as `generate` returns it."""
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0


def check_request(prompt_ids: list[int], params: SamplingParams, config, num_tokens: int, has_tokenizer: bool) -> None:
    """Raise LmforgeError for a request no engine over this model can run (also checked by a
    server's front process before it hands the request to a worker process)."""
    params.validate(num_tokens)
    check_prompt(prompt_ids, config)
    if params.stop and not has_tokenizer:
        raise LmforgeError("stop strings need the engine's tokenizer; pass stop_token_ids instead")


class LLM:
    def __init__(self, model: torch.nn.Module, tokenizer=None, *, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int = 1 << 30, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, seed: int | None = None):
        """`num_blocks` defaults to what `kv_cache_bytes` holds, at most enough for max_num_seqs full
        contexts, and never fewer than one full context plus one step's tokens."""
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(device).eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.device = device
        self.context = self.config.max_position_embeddings
        # Sample only ids the tokenizer can write out (imported tables are padded past the tokenizer).
        self.num_tokens = tokenizer.vocab_size if tokenizer is not None else self.config.vocab_size
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(self.config, block_size, kv_cache_dtype(model, dtype))
            wanted = -(-max_num_seqs * self.context // block_size)
            floor = -(-(self.context + max_num_batched_tokens) // block_size)
            num_blocks = max(floor, min(kv_cache_bytes // per_block, wanted))
        if num_blocks * block_size < self.context:
            raise LmforgeError(f"num_blocks={num_blocks} of {block_size} tokens cannot hold one full context of "
                               f"{self.context} tokens; give at least {-(-self.context // block_size)}")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, num_blocks, block_size, device, dtype)
        self.stop_ids = {i for i in (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "bos_id", None))
                         if i is not None}
        self.special_ids = frozenset(getattr(tokenizer, "special_ids", {}).values())
        self._rng = torch.Generator(device=device)
        self._rng.manual_seed(seed if seed is not None else torch.seed())
        self._requests: dict[str, list[Sequence]] = {}
        self._streams: dict[int, TextStream] = {}
        self._ids = itertools.count()
        self.num_generated_tokens = 0  # over the engine's life, aborted requests' included

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None,
                    **kwargs) -> LLM:
        """An engine over a model folder (or run folder) with its tokenizer. The model is the
        engine's own, so its projections are merged for speed (engine/fuse.py)."""
        from lmforge.checkpoint import load_model
        from lmforge.engine.fuse import fuse_projections
        from lmforge.tokenizer import load_tokenizer

        folder = Path(folder)
        device = get_device(device)
        model = fuse_projections(load_model(folder, device, dtype))
        return cls(model, load_tokenizer(folder / "tokenizer.json"), device=device, **kwargs)

    # ------------------------------------------------------------------------- requests

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                    salt: bytes = b"") -> str:
        """Queue a prompt for `params.n` completions; returns the request id. `salt` separates
        tenants in the prefix cache (a key's own prompts share cached blocks; others' never do)."""
        check_request(prompt_ids, params, self.config, self.num_tokens, self.tokenizer is not None)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise LmforgeError(f"request id {request_id!r} is already in use")
        seqs = []
        for i in range(params.n):
            generator = torch.Generator(device=self.device)
            if params.seed is not None:
                generator.manual_seed((params.seed + i) & (2**64 - 1))  # a 64-bit seed; n choices wrap
            else:
                generator.manual_seed(int(torch.randint(2**62, (1,), generator=self._rng)))
            seq = Sequence(prompt_ids, params, request_id=request_id, index=i, salt=salt, generator=generator)
            if self.tokenizer is not None:
                skip = self.special_ids if params.skip_special_tokens else ()
                self._streams[seq.seq_id] = TextStream(self.tokenizer, params.stop, skip)
            self.scheduler.add(seq)
            seqs.append(seq)
        self._requests[request_id] = seqs
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop a request (e.g. its client went away) and free its cache blocks now."""
        for seq in self._requests.pop(request_id, []):
            self.scheduler.finish(seq)
            self._streams.pop(seq.seq_id, None)

    @property
    def request_ids(self) -> list[str]:
        """Requests added and not yet finished or aborted."""
        return list(self._requests)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # ------------------------------------------------------------------------- one step

    def step(self) -> list[RequestOutput]:
        """One scheduled batch: what every request in it gained. An exception raised while handling
        one request fails that request alone (an output with finish_reason "error"); the others in
        the batch go on, this step or the next."""
        batch = self.scheduler.schedule()
        if not batch:
            assert not self.scheduler.has_work(), "work is waiting but nothing could be scheduled"
            return []
        rows, samplers, scorers = [], [], []  # logit rows; sequences sampling; (seq, first row) scoring prompts
        offset = 0
        for seq, n in batch:
            if seq.params.prompt_logprobs is not None and seq.in_prefill:
                scorers.append((seq, len(rows), n))
                rows.extend(range(offset, offset + n))  # logits at p score token p + 1
            if seq.num_computed + n == len(seq):
                if not (rows and rows[-1] == offset + n - 1):
                    rows.append(offset + n - 1)
                samplers.append((seq, len(rows) - 1))
            offset += n
        try:
            logits = self.runner.run(batch, rows)[:, :self.num_tokens]  # (rows, V)
        except Exception as e:  # noqa: BLE001 - find whose request it was; nothing was committed yet
            return self._isolate(batch, e)
        for seq, n in batch:
            seq.num_computed += n
            self.block_manager.commit(seq)
        failed: list[RequestOutput] = []
        for seq, first, n in scorers:
            self._guarded(failed, seq, self._score_prompt, seq, logits[first:first + n], seq.num_computed - n)

        outputs = []
        samplers = [(s, r) for s, r in samplers if not s.finished]
        if samplers:
            seqs = [s for s, _ in samplers]
            picked = logits if len(samplers) == len(logits) else logits[[r for _, r in samplers]]  # (B, V)
            try:
                tokens = sample(picked, seqs).tolist()
            except Exception:  # noqa: BLE001 - one row at a time, to fail only the row that raises
                tokens = [self._guarded(failed, s, lambda i=i, s=s: sample(picked[i:i + 1], [s]).item())
                          for i, s in enumerate(seqs)]
            want = [s.params.logprobs for s in seqs]
            if any(k is not None for k in want):
                chosen = torch.tensor([t if t is not None else 0 for t in tokens], device=picked.device)
                reported = top_logprobs(picked, chosen, max(k or 0 for k in want))
            for i, (seq, token) in enumerate(zip(seqs, tokens)):
                if token is None or seq.finished:
                    continue
                lp = [] if want[i] is None else [(reported[i][0], reported[i][1][:want[i]])]
                outputs.append(self._guarded(failed, seq, self._append, seq, token, lp))
        # Sequences still prefilling emit nothing this step; those that sampled report their token.
        return failed + [o for o in outputs if o is not None]

    def _guarded(self, failed: list[RequestOutput], seq: Sequence, fn, *args):
        """fn(*args), or None with seq's request failed (its output added to `failed`) if it raises."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - one request's failure is that request's alone
            failed.append(self._fail(seq, e))
            return None

    def _isolate(self, batch: list[tuple[Sequence, int]], error: Exception) -> list[RequestOutput]:
        """The model failed on a batch: run each sequence's part alone to find which request it was,
        and fail those. The rest were not advanced (their cache writes are made again), so the next
        step schedules them as if this one had not happened. If every part runs alone, the failure
        is the engine's, not a request's: it is raised."""
        failed: list[RequestOutput] = []
        for seq, n in batch:
            if not seq.finished:
                self._guarded(failed, seq, self.runner.run, [(seq, n)], [n - 1])
        if not failed:
            raise error
        return failed

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        message = f"{type(error).__name__}: {error}"
        log.error("request %s failed in the engine (the others go on): %s", seq.request_id, message,
                  exc_info=error)
        out = RequestOutput(seq.request_id, seq.index, [], "", [], True, "error", seq.num_prompt_tokens,
                            seq.num_cached_prompt_tokens or 0, seq.num_output_tokens, error=message)
        self.abort(seq.request_id)
        return out

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor, start: int) -> None:
        """Prompt log-probabilities from one chunk's logits at positions start ..: the logits at p
        score prompt token p + 1. A recompute after preemption adds nothing already there."""
        end = min(start + 1 + logits.size(0), seq.num_prompt_tokens)
        targets = torch.tensor(seq.token_ids[start + 1:end], device=logits.device)
        entries = [None] if start == 0 else []
        if len(targets):
            entries += top_logprobs(logits[:len(targets)], targets, seq.params.prompt_logprobs)
        first = 0 if start == 0 else start + 1  # the position entries[0] belongs to
        seq.prompt_logprobs.extend(entries[max(0, len(seq.prompt_logprobs) - first):])

    def _append(self, seq: Sequence, token: int, logprobs: list[Logprob]) -> RequestOutput | None:
        if seq.finished:
            return None
        stream = self._streams.get(seq.seq_id)
        text, reason, new = "", None, [token]
        if seq.params.max_tokens == 0:  # scoring only (echo + logprobs): the prompt was the work
            reason, new, logprobs = "length", [], []
        elif token in seq.params.stop_token_ids or (token in self.stop_ids and not seq.params.ignore_eos):
            reason, new, logprobs = "stop", [], []  # a stop token ends the text and is not part of it
        else:
            seq.token_ids.append(token)
            self.num_generated_tokens += 1
            seq.output_logprobs.extend(logprobs)
            if stream is not None:
                text = stream.push(token)
                if stream.stopped:
                    reason = "stop"
            if reason is None and (seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.context):
                reason = "length"
        if reason is not None and stream is not None and not stream.stopped:
            text += stream.finish()
        return self._output(seq, new, text, logprobs, reason)

    def _output(self, seq: Sequence, new: list[int], text: str, logprobs: list[Logprob],
                reason: str | None) -> RequestOutput:
        first = seq.first_token_time is None
        if first:
            seq.first_token_time = time.monotonic()
        if reason is not None:
            self.scheduler.finish(seq)
            seq.finish_reason = reason
            self._streams.pop(seq.seq_id, None)
            siblings = self._requests.get(seq.request_id, [])
            if all(s.finished for s in siblings):
                self._requests.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, seq.index, new, text, logprobs, reason is not None,
                             reason, seq.num_prompt_tokens, seq.num_cached_prompt_tokens or 0,
                             seq.num_output_tokens, seq.prompt_logprobs if first and seq.prompt_logprobs else None)

    # ------------------------------------------------------------------------- offline use

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[list[Completion]]:
        """Run prompts to completion together; per prompt, its params.n completions."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        done: dict[tuple[str, int], Completion] = {}
        pieces: dict[tuple[str, int], list] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finish_reason == "error":
                    raise LmforgeError(f"request {out.request_id} failed in the engine: {out.error}")
                key = (out.request_id, out.index)
                acc = pieces.setdefault(key, [[], [], [], out.prompt_logprobs])
                acc[0] += out.token_ids
                acc[1].append(out.text)
                acc[2] += out.logprobs
                if out.finished:
                    done[key] = Completion(acc[0], "".join(acc[1]), out.finish_reason, acc[2], acc[3],
                                           out.num_cached_tokens)
        return [[done[(rid, i)] for i in range(sp.n)] for rid, sp in zip(ids, params_list)]
