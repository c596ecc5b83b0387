"""An engine worker in its own process: the server's front process speaks HTTP, the worker steps.

    engine = ProcessEngine(functools.partial(LLM.from_folder, "models/smollm", device="cpu"))
    async for out in engine.generate(prompt_ids, SamplingParams(max_tokens=50)):
        print(out.text, end="")

The face is AsyncEngine's (generate, embed, stats, num_pending, shutdown), so the Router and the
server take either. The difference is where the step loop runs. In a thread of the server's
process, it shares one interpreter lock with the event loop that parses requests and writes
server-sent events. Each hand-off then waits on the other side's Python, and on 2 CPU cores a
1.3M-parameter model decoding alone gave 1,000-1,100 tokens/s in a thread but 300 through the
server. vLLM's engine core and SGLang's scheduler run in their own processes for the same reason.

The two processes talk over one pipe, in pickled tuples:

    front -> worker   ("add", request_id, prompt_ids, params, salt)   ("abort", request_id)
                      ("embed", ticket, ids)                          ("stop",)
                      (embeddings wait in a queue: one runs per step while requests generate)
    worker -> front   ("ready", facts)        once the model is loaded
                      ("out", outputs, stats) after each step: every request's gains, one message
                      ("stats", stats)        when it goes idle (so /metrics sees freed blocks)
                      ("rejected", request_id, error)   ("failed", message, request_ids)
                      ("embedded", ticket, vector or error)

The front process checks each request the way LLM.add_request would (llm.check_request) before
sending it, so a bad request fails at once in the caller; whatever else one request makes go wrong
in the worker (an exception adding it, in its part of a step, in its embedding) fails that request
alone, and the worker serves the rest. The event loop reads the pipe through
`add_reader` (no thread in between) and hands its writes to one sender thread, so it never blocks
on a full pipe; the worker blocks on the pipe when it has nothing to do. If the worker dies, every
caller gets EngineError and later requests are refused.

The worker starts with multiprocessing's "spawn": a script that makes a ProcessEngine needs the
usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import multiprocessing
import signal
from collections.abc import AsyncIterator, Callable

import torch

from lmforge.common import LmforgeError
from lmforge.engine.async_engine import EngineError, Overloaded, check_embed, drain, engine_stats, failed, run_embed
from lmforge.engine.llm import LLM, RequestOutput, check_request
from lmforge.engine.sequence import SamplingParams

log = logging.getLogger(__name__)


class ProcessEngine:
    def __init__(self, make_llm: Callable[[], LLM], *, max_pending: int = 256, name: str = "worker-0",
                 cpu_threads: int | None = 1, start_timeout: float = 600.0, restart: bool = False):
        """make_llm: a picklable callable that builds the worker's LLM in the new process (e.g. a
        functools.partial of LLM.from_folder). cpu_threads: the worker's intra-op threads on CPU,
        one by default so the front process keeps a core for HTTP. restart: start a new worker
        process when this one dies (after 1 s, doubling up to 60 s while it keeps dying)."""
        self.max_pending, self.name, self.restart = max_pending, name, restart
        self._spawn_args = (make_llm, cpu_threads, start_timeout)
        self._conn, self._process, facts = self._spawn()
        self.config, self.num_tokens, self.has_tokenizer, self.block_size, self._stats = facts
        self.context = self.config.max_position_embeddings
        self._queues: dict[str, asyncio.Queue] = {}
        self._embeds: dict[int, asyncio.Future] = {}
        self._ids, self._tickets = itertools.count(), itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Sends go through one thread, in order, so the event loop never blocks on a full pipe: it
        # must stay free to read, or a worker blocked writing its outputs and a loop blocked writing
        # new requests wait on each other for ever (seen with 500 streams and a stalled reader).
        self._sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"lmforge-{name}-send")
        self._closed = False
        self._stopping = False
        self.error: BaseException | None = None
        self.num_restarts = 0
        self._restarting: asyncio.Task | None = None

    def _spawn(self):
        """Start a worker process and wait for its model: (pipe, process, facts)."""
        make_llm, cpu_threads, start_timeout = self._spawn_args
        context = multiprocessing.get_context("spawn")  # fork would copy the parent's threads' locks
        conn, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(make_llm, child, cpu_threads), name=f"lmforge-{self.name}",
                                  daemon=True)
        process.start()
        child.close()
        if not conn.poll(start_timeout):
            process.kill()
            raise EngineError(f"{self.name}: the engine process did not load its model within {start_timeout:.0f} s")
        try:
            kind, *facts = conn.recv()
        except EOFError:
            raise EngineError(f"{self.name}: the engine process exited while loading its model "
                              f"(exit code {process.exitcode})") from None
        if kind == "failed":
            raise EngineError(f"{self.name}: the engine process could not load its model: {facts[0]}")
        return conn, process, facts[0]

    @property
    def num_pending(self) -> int:
        """Requests in flight, embeddings included: admission's bound and the router's measure of load."""
        return len(self._queues) + len(self._embeds)

    @property
    def alive(self) -> bool:
        return self.error is None and self._process.is_alive()

    def stats(self) -> dict:
        return dict(self._stats, pending=self.num_pending, restarts=self.num_restarts)

    # ------------------------------------------------------------------------- the front's side

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                       salt: bytes = b"") -> AsyncIterator[RequestOutput]:
        """As AsyncEngine.generate: outputs until all params.n completions finish."""
        self._admit()
        check_request(prompt_ids, params, self.config, self.num_tokens, self.has_tokenizer)
        request_id = request_id or f"{self.name}-{next(self._ids)}"
        if request_id in self._queues:
            raise LmforgeError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._send(("add", request_id, list(prompt_ids), params, salt))
        remaining = params.n
        try:
            while remaining:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                failed(out)
                remaining -= out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if remaining and self.error is None:  # the caller went away early: free the blocks now
                self._send(("abort", request_id))

    async def embed(self, prompt_ids: list[int]) -> list[float]:
        check_embed(prompt_ids, self.context)
        self._admit()
        ticket = next(self._tickets)
        future = asyncio.get_running_loop().create_future()
        self._embeds[ticket] = future
        self._send(("embed", ticket, list(prompt_ids)))
        try:
            result = await future
        finally:
            self._embeds.pop(ticket, None)
        if isinstance(result, BaseException):
            raise result
        return result

    async def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish (up to drain_seconds), then stop the process."""
        self._stopping = True
        await drain(self, drain_seconds)
        self._send(("stop",))
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._sender.shutdown)  # every send made
        await loop.run_in_executor(None, self._process.join, 5)
        if self._process.is_alive():
            self._process.kill()
        self._detach()
        self._conn.close()

    def _admit(self) -> None:
        if self.error is not None:
            raise EngineError(f"{self.name}: the engine process is gone: {self.error}")
        if self._stopping:
            raise Overloaded("the server is shutting down; retry on another replica")
        if self.num_pending >= self.max_pending:
            raise Overloaded(f"{self.num_pending} requests in flight (the limit is {self.max_pending}); retry shortly")
        self.attach()

    def attach(self) -> None:
        """Read the worker's pipe from the running event loop. The first request does it; a server
        does it at start-up, so that a worker's death is seen (and it restarts) with no request."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop and self.error is None:  # the first call, or a new loop (tests run several)
            self._detach()
            loop.add_reader(self._conn.fileno(), self._receive)
            self._loop = loop

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._loop = None

    def _send(self, message: tuple) -> None:
        if not self._closed:  # after shutdown a late abort has nobody to go to
            self._sender.submit(self._send_now, message)

    def _send_now(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:
            pass  # the worker is gone: _receive sees the closed pipe and tells every caller

    def _receive(self) -> None:
        """Event-loop callback: the pipe has data. Hand every message to whoever waits on it."""
        try:
            while self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError) as e:
            self._lost(e)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "out":
            _, outputs, self._stats = message
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:  # else its caller left; the abort is on its way
                    queue.put_nowait(out)
        elif kind == "stats":
            self._stats = message[1]
        elif kind == "rejected":
            queue = self._queues.get(message[1])
            if queue is not None:
                queue.put_nowait(message[2])
        elif kind == "failed":
            error = EngineError(f"the engine failed: {message[1]}")
            for request_id in message[2]:
                if request_id in self._queues:
                    self._queues[request_id].put_nowait(error)
        elif kind == "embedded":
            future = self._embeds.get(message[1])
            if future is not None and not future.done():
                future.set_result(message[2])

    def _lost(self, cause: BaseException) -> None:
        """The worker process died (killed, out of memory): fail everything waiting on it, and start
        another if asked to."""
        self._process.join(1)
        if self._stopping and not self._queues:  # the "stop" it was sent at shutdown
            self._detach()
            return
        self.error = EngineError(f"{self.name}: the engine process exited (exit code {self._process.exitcode}; "
                                 f"{type(cause).__name__})")
        log.error("%s", self.error)
        loop = self._loop
        self._detach()
        self._conn.close()
        for queue in self._queues.values():
            queue.put_nowait(self.error)
        for future in self._embeds.values():
            if not future.done():
                future.set_result(self.error)
        if self.restart and not self._stopping and loop is not None:
            self._restarting = loop.create_task(self._respawn())

    async def _respawn(self) -> None:
        delay = 1.0
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                conn, process, _ = await asyncio.get_running_loop().run_in_executor(None, self._spawn)
            except EngineError as e:
                delay = min(2 * delay, 60.0)
                log.error("%s; trying again in %.0f s", e, delay)
                continue
            if self._stopping:  # shut down meanwhile
                process.kill()
                return
            self._conn, self._process, self.error = conn, process, None
            self.num_restarts += 1
            log.warning("%s: started a new engine process (restart %d)", self.name, self.num_restarts)
            self.attach()
            return


# ----------------------------------------------------------------------------- the worker's side

def _worker_main(make_llm: Callable[[], LLM], conn, cpu_threads: int | None) -> None:
    # Ctrl-C reaches the whole process group; the front process decides when the worker stops (after
    # draining), and a front that dies outright closes the pipe, which ends this loop too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        llm = make_llm()
    except Exception as e:  # noqa: BLE001 - told to the front process, which raises it for the user
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    facts = (llm.config, llm.num_tokens, llm.tokenizer is not None, llm.block_manager.block_size, engine_stats(llm))
    conn.send(("ready", facts))
    embeds: collections.deque = collections.deque()  # (ticket, ids): one a step while generating
    try:
        while True:
            idle = not llm.has_unfinished() and not embeds
            if idle:
                conn.send(("stats", engine_stats(llm)))
            while conn.poll(None if idle else 0):  # block only when there is nothing to do
                if not _handle(llm, conn, conn.recv(), embeds):
                    return
                idle = False
            if embeds:
                ticket, ids = embeds.popleft()
                conn.send(("embedded", ticket, run_embed(llm, ids)))
            if not llm.has_unfinished():
                continue
            try:
                outputs = llm.step()
            except Exception as e:  # noqa: BLE001 - the engine's own failure: every caller is told, then carry on
                conn.send(("failed", f"{type(e).__name__}: {e}", llm.request_ids))
                for request_id in llm.request_ids:
                    llm.abort(request_id)
                continue
            conn.send(("out", outputs, engine_stats(llm)))
    except (EOFError, OSError):
        return  # the front process is gone (a closed or reset pipe)


def _handle(llm: LLM, conn, message: tuple, embeds: collections.deque) -> bool:
    """Apply one message from the front process; False means stop. A request that cannot be added
    is refused alone: nothing it sends ends the worker."""
    kind = message[0]
    if kind == "add":
        _, request_id, prompt_ids, params, salt = message
        try:
            llm.add_request(prompt_ids, params, request_id=request_id, salt=salt)
        except LmforgeError as e:
            conn.send(("rejected", request_id, e))
        except Exception as e:  # noqa: BLE001 - the front checked it, so this is ours, not the caller's
            log.exception("request %s could not be added", request_id)
            conn.send(("rejected", request_id, EngineError(f"the engine could not take this request: "
                                                           f"{type(e).__name__}: {e}")))
    elif kind == "abort":
        llm.abort(message[1])
    elif kind == "embed":
        embeds.append((message[1], message[2]))
    elif kind == "stop":
        return False
    return True
