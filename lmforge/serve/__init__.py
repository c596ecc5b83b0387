"""`lmforge serve`: an OpenAI-compatible HTTP API over the inference engine.

    POST /v1/completions        text completion; `echo` + `logprobs` score prompts (evaluation harnesses)
    POST /v1/chat/completions   chat through the model's chat template
    POST /v1/embeddings         mean-pooled final hidden states
    GET  /v1/models             the served model
    POST /tokenize, /detokenize token ids in and out
    GET  /health                liveness (public)
    GET  /metrics               Prometheus text format (admin keys, unless started with --public-metrics)
    POST /v1/feedback           a rating (+1/-1) or a better answer for a stored response's choice
    /v1/admin/keys, /v1/admin/usage   key management and the usage ledger (admin keys only)

A thin layer, one file per concern:

    schemas.py     request bodies, every list and string bounded
    admission.py   the gate (key, then body size, before parsing), limits held and settled, the ledger
    generation.py  request -> token ids and SamplingParams -> engine -> JSON or server-sent events
    shapes.py      the engine's outputs as OpenAI's response and chunk objects
    routes.py      the FastAPI app: which checks each route makes
    errors.py      OpenAI's error shape, status codes, and store outages as 503
    metrics.py     Prometheus counters and the engine's gauges
    workers.py     Served, and building it: engine workers (processes) behind a router, stores

`"store": true` on a completion or chat request keeps the response (feedback.py: its id, the key,
the model, the messages or prompts, each choice's text) in the key store's database, streamed ones
too: once the last token is out, before `[DONE]`, so a client that has seen `[DONE]` can rate it.
A stream the client leaves early is not stored. Feedback is for the key's own stored responses
(admins: any); another key's response id is a 404, as an unknown one is. With --no-auth there is
no database, and `store` and /v1/feedback are a 400 saying so.
"""

from lmforge.serve.errors import APIError
from lmforge.serve.routes import create_app
from lmforge.serve.workers import Served, auto_workers, build_served, run_server, worker_llm

__all__ = ["APIError", "Served", "auto_workers", "build_served", "create_app", "run_server", "worker_llm"]
