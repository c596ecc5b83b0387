"""Assembling a server: the model folder loaded into engine workers behind a router, with the key
store, limits and feedback store (`Served`), and uvicorn running the app over it."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from lmforge.common import LmforgeError
from lmforge.serve.admission import DEFAULT_MAX_BODY_BYTES


@dataclass
class Served:
    """What the routes need: the engine, its tokenizer, names, and the optional auth pieces."""
    engine: Any  # Router or AsyncEngine: generate(ids, params, request_id=, salt=), embed(ids), stats()
    tokenizer: Any
    model_name: str
    context: int
    keys: Any = None  # auth.KeyStore, or None for an open server (`--no-auth`)
    limiter: Any = None  # auth.RateLimiter, or None
    admin_key: str | None = None  # from the environment: manages keys without a stored admin key
    feedback: Any = None  # feedback.FeedbackStore: responses kept with store: true and feedback on them
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a larger request body is a 413, cut while it is read
    public_metrics: bool = False  # /metrics without an admin key (for a scraper on a private network)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def workers(self) -> list:
        return getattr(self.engine, "workers", [self.engine])

    @property
    def kv_tokens(self) -> int | None:
        """Tokens of KV cache the smallest worker holds: one request's n choices must fit at once."""
        try:
            return min(w.stats()["total_blocks"] * w.block_size for w in self.workers)
        except (AttributeError, KeyError):
            return None



def auto_workers(folder, device, engine_process: bool = True) -> int:
    """`--workers` left out: on CPU, one single-threaded worker process per usable core while their
    copies of the weights fit in a quarter of memory; one on a GPU (give --workers N for N GPUs).
    On 2 cores, 2 workers served 32 streams at 5,000-6,500 tokens/s against 3,450-3,730 for one
    (BENCHMARKS.md), and a single stream alike."""
    import os
    from pathlib import Path

    if device.type != "cpu" or not engine_process:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    weights = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(cores, memory // 4 // weights))


def build_served(folder, tokenizer_path, *, name: str | None = None, workers: int | None = 1, device: str = "auto",
                 dtype: str = "auto", db: str | None = None, redis: str | None = None, auth: bool = True,
                 max_pending: int = 256, engine_process: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 public_metrics: bool = False, **engine_kwargs) -> Served:
    """Load a model folder into `workers` engines (None: auto_workers) behind a router, with the key
    store and limits.

    Each worker owns a KV pool and a step loop, by default in its own process (ProcessEngine: the
    loop then never waits on the HTTP side's interpreter lock; a worker process that dies is
    started again). With several CUDA devices (`device="cuda"`, workers > 1) worker i runs on
    cuda:i. engine_process=False keeps the loops in threads of this process, where workers on one
    device share the weights.
    """
    import concurrent.futures
    import functools
    from pathlib import Path

    import torch

    from lmforge.checkpoint import load_model
    from lmforge.common import get_device
    from lmforge.engine.async_engine import AsyncEngine, Router
    from lmforge.engine.process_engine import ProcessEngine
    from lmforge.tokenizer import load_tokenizer

    base = get_device(device)
    if workers is None:
        workers = auto_workers(folder, base, engine_process)
    if workers < 1:
        raise LmforgeError(f"--workers {workers}: must be at least 1")
    spread = base.type == "cuda" and workers > 1
    if spread and torch.cuda.device_count() < workers:
        raise LmforgeError(f"--workers {workers} on CUDA needs {workers} GPUs; this machine has "
                           f"{torch.cuda.device_count()}")
    tokenizer = load_tokenizer(tokenizer_path)
    devices = [torch.device(f"cuda:{i}") if spread else base for i in range(workers)]
    from lmforge.engine import cpu_decode

    if engine_process and base.type == "cpu" and cpu_decode.enabled():
        # Built here, once, before the workers start: they then load it at once instead of waiting on
        # each other's build in silence (their processes print no logs).
        if not cpu_decode.is_built():
            print("building the CPU decode kernel (once per machine, about a minute)", file=sys.stderr, flush=True)
        cpu_decode.load_kernel()
    if engine_process:
        def start(i: int) -> ProcessEngine:
            make_llm = functools.partial(worker_llm, str(folder), str(tokenizer_path), str(devices[i]), dtype,
                                         engine_kwargs)
            return ProcessEngine(make_llm, max_pending=max_pending, name=f"worker-{i}", restart=True)

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # they load their models side by side
            engines = list(pool.map(start, range(workers)))
    else:
        models: dict[str, torch.nn.Module] = {}  # one copy of the weights per device, shared by its threads
        engines = []
        for i, dev in enumerate(devices):
            if str(dev) not in models:
                models[str(dev)] = load_model(folder, dev)
            llm = worker_llm(folder, tokenizer, dev, dtype, engine_kwargs, model=models[str(dev)])
            engines.append(AsyncEngine(llm, max_pending=max_pending, name=f"worker-{i}"))
    keys = limiter = admin_key = feedback = None
    if auth:
        from lmforge.auth import KeyStore, env_admin_key, make_rate_limiter
        from lmforge.feedback import FeedbackStore

        keys, limiter, admin_key = KeyStore(db), make_rate_limiter(redis), env_admin_key()
        feedback = FeedbackStore(keys)
    return Served(Router(engines), tokenizer, name or Path(folder).resolve().name, engines[0].context, keys, limiter,
                  admin_key, feedback, max_body_bytes=max_body_bytes, public_metrics=public_metrics)


def worker_llm(folder, tokenizer, device, dtype: str, engine_kwargs: dict, model=None):
    """One worker's engine over a model folder (run in the worker's own process by ProcessEngine,
    which passes the tokenizer's path; a thread worker passes the loaded tokenizer and model)."""
    import torch

    from lmforge.checkpoint import load_model
    from lmforge.common import resolve_dtype
    from lmforge.engine import LLM
    from lmforge.engine.fuse import fuse_projections
    from lmforge.tokenizer import load_tokenizer

    device = torch.device(device)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if model is None:  # the worker's own copy: merge its projections (engine/fuse.py)
        model = fuse_projections(load_model(folder, device))
    return LLM(model, tokenizer, device=device, dtype=resolve_dtype(dtype, device, decoding=True),
               **engine_kwargs)


def run_server(served: Served, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted; on SIGINT/SIGTERM stop accepting, let in-flight requests finish, drain."""
    import uvicorn

    from lmforge.serve.routes import create_app

    uvicorn.run(create_app(served), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
