"""The engine for a server: a step loop in a background thread, streamed to asyncio callers, and a
router that spreads requests over several such workers.

    engine = AsyncEngine(LLM.from_folder("models/smollm"))
    async for out in engine.generate(prompt_ids, SamplingParams(max_tokens=50)):
        print(out.text, end="")

Each worker owns one LLM (one GPU, or a share of the CPU) and runs `step()` whenever it has work;
outputs go to the caller's asyncio queue through the event loop's thread-safe hand-off. A caller
that stops iterating (its HTTP client disconnected, its task was cancelled) aborts the request,
which frees its KV blocks at once. Admission is bounded: beyond `max_pending` requests in flight,
`generate` raises `Overloaded` at once (the server answers 503) rather than queueing without end.

The router sends each request to the least-loaded worker, except that a worker which recently
served the same prompt prefix (same first cache block, same tenant) is preferred while it is not
much busier: its prefix cache then turns the prefill into a hit.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator

import torch

from lmforge.common import LmforgeError
from lmforge.engine.block_manager import block_hash
from lmforge.engine.llm import LLM, RequestOutput
from lmforge.engine.sequence import SamplingParams


def engine_stats(llm: LLM) -> dict:
    """The gauges /metrics shows for one worker (with `pending`, which its owner adds)."""
    blocks = llm.block_manager
    return dict(running=len(llm.scheduler.running), waiting=len(llm.scheduler.waiting),
                free_blocks=blocks.num_free_blocks, total_blocks=blocks.num_blocks, prefix_queries=blocks.num_queries,
                prefix_hits=blocks.num_hits, preemptions=llm.scheduler.num_preemptions,
                generated_tokens=llm.num_generated_tokens)


async def drain(worker, seconds: float) -> None:
    """Wait until a worker that stopped admitting has no request in flight, or `seconds` passed."""
    for _ in range(int(seconds * 20)):
        if not worker.num_pending:
            return
        await asyncio.sleep(0.05)


def check_embed(prompt_ids: list[int], context: int) -> None:
    if not prompt_ids:
        raise LmforgeError("input is empty (0 tokens)")
    if len(prompt_ids) > context:
        raise LmforgeError(f"input has {len(prompt_ids)} tokens but the model's context is {context}")


def run_embed(llm: LLM, ids: list[int]) -> list[float] | BaseException:
    """One embedding, or the exception it raised (handed to its caller, never to the step loop)."""
    try:
        return llm.runner.embed(ids).tolist()
    except LmforgeError as e:
        return e
    except Exception as e:  # noqa: BLE001 - one input's failure is that request's alone
        return EngineError(f"the engine failed on this embedding: {type(e).__name__}: {e}")


def _settle(future: asyncio.Future, result) -> None:
    if future.done():  # its caller went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Overloaded(LmforgeError):
    """Too many requests in flight: try again shortly."""


class EngineError(LmforgeError):
    """The engine itself failed (a bug or the device), not the request."""


def failed(out: RequestOutput) -> None:
    """Raise EngineError for an output that says its request failed in the engine (the engine and
    every other request go on)."""
    if out.finish_reason == "error":
        raise EngineError(f"the engine failed on this request: {out.error}")


class AsyncEngine:
    def __init__(self, llm: LLM, *, max_pending: int = 256, name: str = "worker-0", cpu_threads: int | None = 1):
        """cpu_threads: intra-op threads of this worker's step loop on CPU. PyTorch's OpenMP regions
        entered from a thread other than the main one ran 3x slower here with 2 threads than with 1
        (decode of a 1.3M-parameter model: 210 vs 580 tokens/s on 2 cores; bench/serve.py); one
        thread per worker, with workers up to the core count, is the CPU default."""
        self.llm, self.max_pending, self.name, self.cpu_threads = llm, max_pending, name, cpu_threads
        self._lock = threading.Lock()  # the LLM is not thread-safe: steps, adds and aborts take turns
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._embeds: collections.deque = collections.deque()  # (ids, loop, future), run by the step loop
        self._stopping = False
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"lmforge-{name}", daemon=True)
        self._thread.start()

    @property
    def num_pending(self) -> int:
        """Requests in flight (queued or generating, embeddings included): the router's measure of load."""
        return len(self._queues) + len(self._embeds)

    def _admit(self) -> None:
        if self._stopping:
            raise Overloaded("the server is shutting down; retry on another replica")
        if self.num_pending >= self.max_pending:
            raise Overloaded(f"{self.num_pending} requests in flight (the limit is {self.max_pending}); retry shortly")

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                       salt: bytes = b"") -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until all its params.n completions finish.

        Raises LmforgeError for a request the engine cannot run (the caller's mistake), Overloaded
        when max_pending requests are already in flight or the engine is shutting down."""
        self._admit()
        request_id = request_id or f"{self.name}-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.llm.add_request(prompt_ids, params, request_id=request_id, salt=salt)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        remaining = params.n
        try:
            while remaining:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise EngineError(f"the engine failed: {out}") from out
                failed(out)
                remaining -= out.finished
                yield out
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
                if remaining:  # the caller went away early: free the blocks now
                    self.llm.abort(request_id)

    async def embed(self, prompt_ids: list[int]) -> list[float]:
        """Mean-pooled final hidden state (unit length), computed by the step loop between steps: one
        embedding per step while requests are generating, so a flood of them cannot starve decoding."""
        check_embed(prompt_ids, self.llm.context)
        self._admit()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._embeds.append((list(prompt_ids), loop, future))
        self._wake.set()
        return await future

    def attach(self) -> None:
        """Nothing to do: the step loop's thread hands outputs to whichever loop each caller runs on
        (ProcessEngine.attach is where this matters)."""

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def block_size(self) -> int:
        return self.llm.block_manager.block_size

    @property
    def context(self) -> int:
        return self.llm.context

    def stats(self) -> dict:
        return dict(engine_stats(self.llm), pending=self.num_pending, restarts=0)  # a thread is not restarted

    async def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish (up to drain_seconds), then stop the loop."""
        self._stopping = True
        await drain(self, drain_seconds)
        self._wake.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        if self.llm.device.type == "cpu" and self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)
        while not (self._stopping and not self.num_pending):
            if self._embeds:
                ids, loop, future = self._embeds.popleft()
                with self._lock:
                    result = run_embed(self.llm, ids)
                loop.call_soon_threadsafe(_settle, future, result)
            with self._lock:
                busy = self.llm.has_unfinished() or bool(self._embeds)
                try:
                    outputs = self.llm.step() if busy else []
                except BaseException as e:  # noqa: BLE001 - reported to every waiting caller, not lost
                    self.error = e
                    for loop, queue in self._queues.values():
                        loop.call_soon_threadsafe(queue.put_nowait, e)
                    for request_id in list(self._queues):
                        self.llm.abort(request_id)
                    outputs, busy = [], False
                targets = [(self._queues.get(o.request_id), o) for o in outputs]
            for target, out in targets:
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)
            busy = busy or bool(self._embeds)
            if not busy:
                self._wake.wait(timeout=0.1)
                self._wake.clear()


class Router:
    """Spreads requests over workers: least pending first, with prefix affinity."""

    def __init__(self, workers: list[AsyncEngine], *, affinity_slack: int = 4, memory: int = 4096):
        assert workers
        self.workers, self.affinity_slack, self.memory = workers, affinity_slack, memory
        self._recent: OrderedDict[bytes, AsyncEngine] = OrderedDict()  # first-block hash -> worker

    def attach(self) -> None:
        """Let workers that read from the event loop (ProcessEngine) start doing so: a server's start-up."""
        for worker in self.workers:
            worker.attach()

    @property
    def alive_workers(self) -> list:
        return [w for w in self.workers if w.alive]

    def _least_loaded(self):
        alive = self.alive_workers
        if not alive:  # every worker process exited (killed, out of memory): nothing can serve
            raise Overloaded(f"none of the {len(self.workers)} engine workers is running (see the server's log); "
                             "retry on another replica")
        return min(alive, key=lambda w: w.num_pending)

    def pick(self, prompt_ids: list[int], salt: bytes = b"") -> AsyncEngine:
        """The least-loaded live worker, or the live one that recently served this prompt's first
        block while it is at most affinity_slack requests busier."""
        least = self._least_loaded()
        block_size = least.block_size
        if len(prompt_ids) <= block_size:
            return least  # no full block: nothing a cache could hold
        key = block_hash(None, prompt_ids[:block_size], salt)
        holder = self._recent.get(key)
        chosen = holder if holder is not None and holder.alive and \
            holder.num_pending <= least.num_pending + self.affinity_slack else least
        self._recent[key] = chosen
        self._recent.move_to_end(key)
        if len(self._recent) > self.memory:
            self._recent.popitem(last=False)
        return chosen

    def generate(self, prompt_ids: list[int], params: SamplingParams, **kwargs) -> AsyncIterator[RequestOutput]:
        return self.pick(prompt_ids, kwargs.get("salt", b"")).generate(prompt_ids, params, **kwargs)

    async def embed(self, prompt_ids: list[int]) -> list[float]:
        return await self._least_loaded().embed(prompt_ids)

    def stats(self) -> dict:
        per = [w.stats() for w in self.workers]
        return {k: sum(s[k] for s in per) for k in per[0]}

    async def shutdown(self, drain_seconds: float = 30.0) -> None:
        await asyncio.gather(*(w.shutdown(drain_seconds) for w in self.workers))
