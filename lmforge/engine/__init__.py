"""lmforge's inference engine: paged KV cache, continuous batching, prefix caching, sampling.

    sequence.py       SamplingParams and Sequence: one request's settings and tokens
    block_manager.py  paged KV blocks, reference counts, hash-chained prefix cache with LRU eviction
    scheduler.py      continuous batching under a token budget, chunked prefill, preemption
    model_runner.py   the packed batch through the model against the paged cache
    sampler.py        per-row penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs
    llm.py            LLM: add_request / step / abort, and generate for offline use
    async_engine.py   AsyncEngine: the step loop in a thread, streamed to asyncio; Router over workers
    process_engine.py ProcessEngine: AsyncEngine's face with the step loop in its own process
    fuse.py           fuse_projections: q/k/v and gate/up as one matmul each, for inference
    cpu_decode.py     CpuDecoder: on CPU, decodes and short prompt chunks in one C++ call (csrc/cpu_decode.cpp)
"""

from lmforge.engine.llm import LLM, Completion, RequestOutput
from lmforge.engine.sequence import SamplingParams

__all__ = ["LLM", "Completion", "RequestOutput", "SamplingParams"]
