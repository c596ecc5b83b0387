"""`lmforge serve`: an OpenAI-compatible HTTP API over the inference engine.

    POST /v1/completions        text completion; `echo` + `logprobs` score prompts (evaluation harnesses)
    POST /v1/chat/completions   chat through the model's chat template
    POST /v1/embeddings         mean-pooled final hidden states
    GET  /v1/models             the served model
    POST /tokenize, /detokenize token ids in and out
    GET  /health                liveness (the one public route)
    GET  /metrics               Prometheus text format
    POST /v1/feedback           a rating (+1/-1) or a better answer for a stored response's choice
    /v1/admin/keys, /v1/admin/usage   key management and the usage ledger (admin keys only)

A thin layer: requests are validated into SamplingParams and token ids, the engine (a Router over
AsyncEngine workers) streams RequestOutputs, and they are shaped as OpenAI's JSON or server-sent
events. Keys, limits and the ledger live in auth.py. Errors carry OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with the status codes clients act on: 400 bad
request, 401 no or unknown key, 403 model not allowed for the key, 404 unknown model, 429 rate or
quota (with Retry-After), 503 overloaded.

`"store": true` on a completion or chat request keeps the response (feedback.py: its id, the key,
the model, the messages or prompts, each choice's text) in the key store's database, streamed ones
too: once the last token is out, before `[DONE]`, so a client that has seen `[DONE]` can rate it.
A stream the client leaves early is not stored. Feedback is for the key's own stored responses
(admins: any); another key's response id is a 404, as an unknown one is. With --no-auth there is
no database, and `store` and /v1/feedback are a 400 saying so.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.common import LmforgeError
from lmforge.conversations import render_template
from lmforge.engine.async_engine import EngineError, Overloaded
from lmforge.engine.sequence import SamplingParams

log = logging.getLogger("lmforge.serve")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ----------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    store: bool = False  # keep the response for /v1/feedback
    # Beyond OpenAI, as vLLM accepts them
    top_k: int | None = Field(default=None, ge=1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # false: special tokens appear in the text too


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class FeedbackRequest(_Body):
    response_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(default=0, ge=0)
    rating: Literal[1, -1, "up", "down"] | None = None
    preferred: str | None = None  # a better answer, written by the user
    comment: str | None = None


class KeyCreateRequest(_Body):
    name: str = Field(min_length=1, max_length=100)
    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    token_budget: int | None = Field(default=None, ge=1)
    admin: bool = False


# ----------------------------------------------------------------------------- the served model

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
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Caller:
    key_id: str | None  # None on an open server
    record: Any = None

    @property
    def admin(self) -> bool:
        # key_id "admin" without a record is the environment's LMFORGE_ADMIN_KEY (stored key ids are hex)
        return (self.key_id == "admin" and self.record is None) or (self.record is not None and self.record.admin)

    @property
    def salt(self) -> bytes:
        # Each key has its own prefix-cache namespace: a cache hit cannot reveal another key's prompts.
        return (self.key_id or "").encode()


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def create_app(served: Served) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine.attach()  # worker processes are watched (and restarted) from now on
        yield
        await served.engine.shutdown()  # uvicorn has let in-flight requests finish; stop the workers

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.served = served
    metrics = _Metrics()

    # -- errors in OpenAI's shape ------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.errors.labels(str(e.status)).inc()
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, loc = "the request body is not valid JSON; send a JSON object", []
        elif first.get("type") == "extra_forbidden":
            message = f"unknown field {'.'.join(loc)!r}; remove it (see the API reference for accepted fields)"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        metrics.errors.labels("400").inc()
        return JSONResponse(error_body(message, "invalid_request_error", ".".join(loc) or None, "invalid_value"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = str(e.detail)
        if e.status_code == 400 and "parsing the body" in message:  # undecodable bytes, e.g. invalid UTF-8
            message = "the request body could not be read as JSON (is it UTF-8?); send a UTF-8 JSON object"
        return JSONResponse(error_body(message, kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        metrics.errors.labels("500").inc()
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    # -- who is calling ---------------------------------------------------------------------

    async def caller(request: Request) -> Caller:
        if served.keys is None:
            return Caller(None)
        token = _bearer(request)
        if token is None:
            raise APIError(401, "no API key: send 'Authorization: Bearer <key>' (create one with "
                                "`lmforge keys create`)", "authentication_error", code="missing_api_key")
        if served.admin_key is not None and hmac.compare_digest(token.encode(), served.admin_key.encode()):
            return Caller("admin", None)
        record = await run_in_threadpool(served.keys.authenticate, token)
        if record is None:
            raise APIError(401, "invalid API key (unknown or revoked)", "authentication_error", code="invalid_api_key")
        return Caller(record.id, record)

    async def admin(who: Caller = Depends(caller)) -> Caller:
        if served.keys is None:
            raise APIError(404, "key management needs a key store; start the server without --no-auth",
                           "not_found_error")
        if not who.admin:
            raise APIError(403, "this route needs an admin key", "permission_error", code="not_admin")
        return who

    def check_model(name: str | None, who: Caller) -> None:
        if name is not None and name != served.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {served.model_name!r}",
                           "not_found_error", "model", "model_not_found")
        if who.record is not None and not who.record.allows(served.model_name):
            raise APIError(403, f"this key may not use model {served.model_name!r}", "permission_error", "model",
                           "model_not_allowed")

    def check_store(param: str | None) -> None:
        if served.feedback is None:
            raise APIError(400, "this server keeps no responses: it runs without a database (--no-auth); restart "
                                "it without --no-auth to use store and /v1/feedback", param=param,
                           code="store_unavailable")

    async def keep(who: Caller, shaper: _Shaper) -> None:
        """Store a finished response whose request said `store: true`."""
        await run_in_threadpool(served.feedback.store_response, shaper.request_id, who.key_id, served.model_name,
                                shaper.texts(), **shaper.stored_prompt())

    async def admit(who: Caller, request_id: str, tokens: int) -> None:
        """Rate limits and budget, before any work is queued. `tokens`, the most the request may use
        (its prompts plus max_tokens for each choice), is held against the key's tokens/minute until
        account() replaces it with what the request used."""
        record = who.record
        if record is None:
            return
        if served.limiter is not None and record.rpm:
            wait = await run_in_threadpool(served.limiter.acquire_request, record.id, record.rpm)
            if wait is not None:
                raise _rate_limited(f"rate limit of {record.rpm} requests per minute reached", wait)
        if record.token_budget is not None:
            used = await run_in_threadpool(served.keys.tokens_used, record.id)
            if used >= record.token_budget:
                raise APIError(429, f"token budget of {record.token_budget} used up ({used} tokens); ask for more",
                               "insufficient_quota", code="insufficient_quota")
        if served.limiter is not None and record.tpm:
            if tokens > record.tpm:  # no wait would let it through (OpenAI's "request too large")
                raise APIError(429, f"this request may use {tokens} tokens (its prompt plus max_tokens for each "
                                    f"choice), more than the key's limit of {record.tpm} tokens per minute; lower "
                                    "max_tokens or n", "tokens", code="rate_limit_exceeded")
            wait = await run_in_threadpool(served.limiter.reserve_tokens, record.id, record.tpm, tokens, request_id)
            if wait is not None:
                raise _rate_limited(f"rate limit of {record.tpm} tokens per minute reached", wait)

    async def account(who: Caller, request_id: str, usage: dict, *, ledger: bool = True) -> None:
        """What a request used: settled against its tokens/minute reservation and, unless it was
        refused before it ran (ledger=False), billed in the usage ledger."""
        if ledger:
            metrics.prompt_tokens.inc(usage["prompt_tokens"])
            metrics.completion_tokens.inc(usage["completion_tokens"])
        if who.record is None:
            return
        total = usage["prompt_tokens"] + usage["completion_tokens"]
        if served.limiter is not None and who.record.tpm:
            await run_in_threadpool(served.limiter.settle_tokens, who.record.id, request_id, total)
        if not ledger:
            return
        await run_in_threadpool(served.keys.record_usage, who.record.id, served.model_name, request_id,
                                usage["prompt_tokens"], usage["completion_tokens"],
                                usage["prompt_tokens_details"]["cached_tokens"])

    # -- routes -----------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        """200 while a worker can serve (a load balancer's check), 503 once none can."""
        workers = getattr(served.engine, "workers", [served.engine])
        alive = sum(w.alive for w in workers)
        body = {"status": "ok" if alive == len(workers) else "degraded" if alive else "unavailable",
                "model": served.model_name, "workers": {"running": alive, "total": len(workers)}}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_route(who: Caller = Depends(caller)):
        return Response(metrics.render(served.engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(who: Caller = Depends(caller)):
        visible = who.record is None or who.record.allows(served.model_name)
        data = [{"id": served.model_name, "object": "model", "created": served.created, "owned_by": "lmforge",
                 "max_model_len": served.context}] if visible else []
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def model(name: str, who: Caller = Depends(caller)):
        check_model(name, who)
        return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "lmforge"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, who: Caller = Depends(caller)):
        check_model(body.model, who)
        prompts = _prompts(body.prompt, served)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported (use n)", param="best_of")
        params = _sampling(body, served, max_tokens=16 if body.max_tokens is None else body.max_tokens,
                           logprobs=body.logprobs,
                           prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None)
        for ids in prompts:
            _check_length(ids, params, served)
        if body.store:
            check_store("store")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        await admit(who, request_id, sum(len(ids) + params.max_tokens * params.n for ids in prompts))
        shaper = _CompletionShaper(served, body, prompts, request_id)
        return await _respond(served, request, who, body, prompts, params, request_id, shaper, account, keep,
                              metrics)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request, who: Caller = Depends(caller)):
        check_model(body.model, who)
        ids = _render_chat(served, body.messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = _sampling(body, served, max_tokens=limit, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        end = getattr(served.tokenizer, "special_ids", {}).get("<|assistant_end|>")
        if end is not None:
            params.stop_token_ids = [*params.stop_token_ids, end]
        _check_length(ids, params, served)
        if body.store:
            check_store("store")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        await admit(who, request_id, len(ids) + params.max_tokens * params.n)
        shaper = _ChatShaper(served, body, request_id)
        return await _respond(served, request, who, body, [ids], params, request_id, shaper, account, keep, metrics)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, who: Caller = Depends(caller)):
        check_model(body.model, who)
        if body.dimensions is not None:
            raise APIError(400, "dimensions is not supported: embeddings have the model's width", param="dimensions")
        inputs = _prompts(body.input, served, name="input")
        for i, ids in enumerate(inputs):
            if len(ids) > served.context:
                raise APIError(400, f"input {i} has {len(ids)} tokens; the model's context is {served.context}",
                               param="input", code="context_length_exceeded")
        request_id = f"embd-{uuid.uuid4().hex}"
        n = sum(len(ids) for ids in inputs)
        await admit(who, request_id, n)
        data = []
        for i, ids in enumerate(inputs):
            vector = await served.engine.embed(ids)
            if body.encoding_format == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        usage = {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        await account(who, request_id, usage)
        return {"object": "list", "data": data, "model": served.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, who: Caller = Depends(caller)):
        check_model(body.model, who)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            ids = _render_chat(served, body.messages)
        else:
            encode = served.tokenizer.encode_with_special if body.add_special_tokens else served.tokenizer.encode
            ids = encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, who: Caller = Depends(caller)):
        check_model(body.model, who)
        bad = [t for t in body.tokens if not 0 <= t < served.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary 0..{served.tokenizer.vocab_size - 1}",
                           param="tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, who: Caller = Depends(caller)):
        check_store(None)
        rating = {"up": 1, "down": -1}.get(body.rating, body.rating)
        if body.preferred is not None and not body.preferred.strip():
            raise APIError(400, "preferred is empty; write the better answer, or leave preferred out",
                           param="preferred")
        if rating is None and body.preferred is None:
            raise APIError(400, "give a rating (1 or 'up', -1 or 'down'), a preferred answer, or both", param="rating")
        response = await run_in_threadpool(served.feedback.response, body.response_id)
        if response is None or (response.key_id != who.key_id and not who.admin):
            # The same answer for another key's response as for none: a key never learns of others' ids.
            raise APIError(404, f"no stored response {body.response_id!r} for this key; feedback is for responses "
                                "this key made with store: true", "not_found_error", "response_id",
                           "response_not_found")
        if body.choice_index >= len(response.choices):
            raise APIError(400, f"choice_index {body.choice_index}: response {response.id!r} has "
                                f"{len(response.choices)} choice(s), numbered from 0", param="choice_index")
        if body.preferred == response.choices[body.choice_index]:
            raise APIError(400, "preferred is the answer itself; to say it was good, send rating 'up' instead",
                           param="preferred")
        return await run_in_threadpool(served.feedback.add_feedback, response.id, body.choice_index, who.key_id,
                                       rating, body.preferred, body.comment)

    @app.post("/v1/admin/keys")
    async def create_key(body: KeyCreateRequest, who: Caller = Depends(admin)):
        try:
            plaintext, record = await run_in_threadpool(
                served.keys.create_key, body.name, models=body.models, rpm=body.rpm, tpm=body.tpm,
                token_budget=body.token_budget, admin=body.admin)
        except LmforgeError as e:
            raise APIError(400, str(e), param="name") from e
        return {"key": plaintext, **_key_json(record)}

    @app.get("/v1/admin/keys")
    async def list_keys(who: Caller = Depends(admin)):
        return {"object": "list", "data": [_key_json(r) for r in await run_in_threadpool(served.keys.list_keys)]}

    @app.delete("/v1/admin/keys/{name}")
    async def revoke_key(name: str, who: Caller = Depends(admin)):
        try:
            await run_in_threadpool(served.keys.revoke, name)
        except LmforgeError as e:
            raise APIError(404, str(e), "not_found_error", "name") from e
        return {"revoked": name}

    @app.get("/v1/admin/usage")
    async def usage(by: Literal["key", "day"] = "key", who: Caller = Depends(admin)):
        rows = await run_in_threadpool(served.keys.usage, by)
        return {"object": "list", "data": [r if isinstance(r, dict) else r._asdict() for r in rows]}

    return app


def _rate_limited(message: str, wait: float) -> APIError:
    seconds = max(1, int(wait + 0.999))
    return APIError(429, f"{message}; retry in {seconds} s", "rate_limit_exceeded", code="rate_limit_exceeded",
                    headers={"Retry-After": str(seconds)})


def _key_json(record) -> dict:
    return {"id": record.id, "name": record.name, "models": record.models, "rpm": record.rpm, "tpm": record.tpm,
            "token_budget": record.token_budget, "admin": record.admin}


# ----------------------------------------------------------------------------- request -> engine

def _prompts(prompt, served: Served, name: str = "prompt") -> list[list[int]]:
    """OpenAI's four prompt forms (text, texts, ids, lists of ids) as lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, f"{name} is empty", param=name)
    out = []
    for p in prompt:
        ids = served.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, f"{name} is empty (0 tokens)", param=name)
        bad = [t for t in ids if not 0 <= t < served.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary", param=name)
        out.append(ids)
    return out


def _plain_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template sees them: role and text content."""
    plain = []
    for m in messages:
        content = m.content
        if isinstance(content, list):  # content parts: only text is understood
            if any(part.get("type") != "text" for part in content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "".join(part.get("text", "") for part in content)
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return plain


def _render_chat(served: Served, messages: list[ChatMessage]) -> list[int]:
    template = getattr(served.tokenizer, "chat_template", None)
    if not template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages",
                       code="no_chat_template")
    plain = _plain_messages(messages)
    if not any(m["content"] for m in plain):
        raise APIError(400, "every message is empty; say something", param="messages")
    try:
        text = render_template(template, plain, served.tokenizer)
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception, or a message it cannot render
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e
    return served.tokenizer.encode_with_special(text)


def _sampling(body: _Sampling, served: Served, *, max_tokens: int | None, logprobs: int | None = None,
              prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's sampling fields as SamplingParams; max_tokens None means "up to the context",
    settled per prompt by _check_length."""
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(
        max_tokens=max_tokens or 0, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        min_p=body.min_p, repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.seed, stop=stop,
        stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos, n=body.n, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, skip_special_tokens=body.skip_special_tokens)
    try:
        params.validate(served.tokenizer.vocab_size)
    except LmforgeError as e:
        raise APIError(400, str(e), param=str(e).split("=")[0]) from e
    params.max_tokens = max_tokens
    return params


def _check_length(ids: list[int], params: SamplingParams, served: Served) -> None:
    room = served.context - len(ids)
    if room <= 0:
        raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is {served.context}; "
                            "shorten it", param="messages", code="context_length_exceeded")
    if params.max_tokens is None:
        params.max_tokens = room
    elif params.max_tokens > room:
        raise APIError(400, f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} tokens exceed the model's "
                            f"context of {served.context}; ask for at most {room}", param="max_tokens",
                       code="context_length_exceeded")


async def _respond(served, request, who, body, prompts, params, request_id, shaper, account, keep, metrics):
    """Run every prompt through the engine; stream events or gather one JSON answer. `keep(who, shaper)`
    stores the finished response when the request asked (store: true)."""
    started = time.perf_counter()

    async def outputs() -> AsyncIterator[tuple[int, Any]]:
        # Several prompts (completions' list form) run one after another per request, each streamed.
        for p, ids in enumerate(prompts):
            try:
                gen = served.engine.generate(ids, params, request_id=f"{request_id}-{p}", salt=who.salt)
                async for out in gen:
                    yield p, out
            except Overloaded as e:
                raise APIError(503, str(e), "server_error", code="overloaded", headers={"Retry-After": "1"}) from e
            except EngineError as e:
                raise APIError(500, str(e), "server_error") from e
            except LmforgeError as e:
                raise APIError(400, str(e)) from e

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = outputs()
        try:  # the first output, so that a refusal (503, 400) is still an HTTP status, not a broken stream
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await account(who, request_id, shaper.usage(), ledger=False)  # refused: free its reservation
            raise

        async def events():
            try:
                if first is not None:
                    metrics.ttft.observe(time.perf_counter() - started)
                    for chunk in shaper.chunks(*first):
                        yield f"data: {json.dumps(chunk)}\n\n"
                async for p, out in stream:
                    for chunk in shaper.chunks(p, out):
                        yield f"data: {json.dumps(chunk)}\n\n"
                usage = shaper.usage()
                if include_usage:
                    yield f"data: {json.dumps(shaper.usage_chunk(usage))}\n\n"
                if body.store:
                    await keep(who, shaper)
                yield "data: [DONE]\n\n"
                metrics.requests.labels(shaper.route).inc()
            except APIError as e:
                yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
            finally:
                # A client that went away lands here with this task cancelled: shielded, its generation
                # is still aborted (aclose) and the tokens made for it still reach the ledger, once.
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                    await account(who, request_id, shaper.usage())

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})

    stream = outputs()
    try:
        async for p, out in stream:
            if shaper.num_outputs == 0:
                metrics.ttft.observe(time.perf_counter() - started)
            shaper.add(p, out)
            if shaper.num_outputs % 16 == 0 and await request.is_disconnected():
                break  # nobody is listening: stop generating
    except BaseException:
        with anyio.CancelScope(shield=True):
            await account(who, request_id, shaper.usage(), ledger=False)  # refused or failed: not billed
        raise
    finally:
        await stream.aclose()  # aborts the generation if it has not finished
    usage = shaper.usage()
    await account(who, request_id, usage)  # what was generated is billed, answered or not
    if not shaper.finished:
        return Response(status_code=499)  # nginx's "client closed request"
    if body.store:
        await keep(who, shaper)
    metrics.requests.labels(shaper.route).inc()
    return shaper.response(usage)


# ----------------------------------------------------------------------------- engine -> OpenAI JSON

def _token_text(tokenizer, token: int) -> str:
    return tokenizer.id_to_bytes(token).decode("utf-8", errors="replace")


class _Shaper:
    """Accumulates a request's outputs per choice and writes OpenAI's JSON."""
    route = ""

    def __init__(self, served: Served, body, request_id: str, num_prompts: int = 1):
        self.served, self.body, self.request_id = served, body, request_id
        self.num_choices = num_prompts * body.n
        self.created = int(time.time())
        self.choices: dict[int, dict] = {}
        self.prompt_tokens = self.cached_tokens = 0
        self.num_outputs = 0
        self._counted: set[int] = set()
        self._texts: dict[int, str] = {}  # choice index -> generated text so far, streamed or gathered
        self._generated: dict[int, int] = {}  # choice index -> completion tokens so far
        self._finished: set[int] = set()

    def _choice_index(self, p: int, out) -> int:
        return p * self.body.n + out.index

    def _count(self, p: int, out) -> None:
        """Usage, and each choice's generated text (what store: true keeps), for add() and chunks() alike."""
        self.num_outputs += 1
        i = self._choice_index(p, out)
        self._texts[i] = self._texts.get(i, "") + out.text
        self._generated[i] = out.num_output_tokens  # a running total: a cut-short choice counts what it made
        if out.finished:
            self._finished.add(i)
        if p not in self._counted:  # the prompt counts once, whatever n is
            self._counted.add(p)
            self.prompt_tokens += out.num_prompt_tokens
            self.cached_tokens += out.num_cached_tokens

    def texts(self) -> list[str]:
        """The generated text of every choice, by index; a completion's echoed prompt is not part of it."""
        return [self._texts[i] for i in sorted(self._texts)]

    @property
    def finished(self) -> bool:
        """Every choice of every prompt ran to its end (not cut short by a client that left)."""
        return len(self._finished) == self.num_choices

    def usage(self) -> dict:
        completion_tokens = sum(self._generated.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.request_id, "object": self.chunk_object, "created": self.created,
                "model": self.served.model_name, "choices": [], "usage": usage}


class _CompletionShaper(_Shaper):
    route, chunk_object = "completions", "text_completion"

    def __init__(self, served, body, prompts, request_id):
        super().__init__(served, body, request_id, len(prompts))
        self.prompts = prompts

    def stored_prompt(self) -> dict:
        """{"prompts": one text per prompt}: as sent, or decoded where the prompt was token ids."""
        raw = self.body.prompt
        if isinstance(raw, str) or all(isinstance(t, int) for t in raw):
            raw = [raw]
        return {"prompts": [p if isinstance(p, str) else self.served.tokenizer.decode(ids)
                            for p, ids in zip(raw, self.prompts)]}

    def _logprobs(self, tokens: list[int], logprobs: list, offset: int) -> dict:
        tok = self.served.tokenizer
        texts = [_token_text(tok, t) for t in tokens]
        offsets, at = [], offset
        for t in texts:
            offsets.append(at)
            at += len(t)
        return {"tokens": texts, "token_logprobs": [None if lp is None else lp[0] for lp in logprobs],
                "top_logprobs": [None if lp is None else {_token_text(tok, i): v for i, v in lp[1]}
                                 for lp in logprobs], "text_offset": offsets}

    def _echo(self, p: int, out) -> tuple[str, dict | None]:
        ids = self.prompts[p]
        text = self.served.tokenizer.decode(ids)
        lp = None
        if self.body.logprobs is not None:
            lp = self._logprobs(ids, out.prompt_logprobs or [None] * len(ids), 0)
        return text, lp

    def add(self, p: int, out) -> None:
        self._count(p, out)
        i = self._choice_index(p, out)
        choice = self.choices.setdefault(i, {"index": i, "text": "", "tokens": [], "logprobs": [],
                                             "finish_reason": None, "echo": None})
        if self.body.echo and choice["echo"] is None:
            choice["echo"] = self._echo(p, out)
        choice["text"] += out.text
        choice["tokens"] += out.token_ids
        choice["logprobs"] += out.logprobs
        choice["finish_reason"] = out.finish_reason

    def response(self, usage: dict) -> dict:
        choices = []
        for i in sorted(self.choices):
            c = self.choices[i]
            text, lp = c["text"], None
            if self.body.logprobs is not None:
                lp = self._logprobs(c["tokens"], c["logprobs"], 0)
            if c["echo"] is not None:
                echo_text, echo_lp = c["echo"]
                text = echo_text + text
                if lp is not None and echo_lp is not None:
                    shift = len(echo_text)
                    lp = {"tokens": echo_lp["tokens"] + lp["tokens"],
                          "token_logprobs": echo_lp["token_logprobs"] + lp["token_logprobs"],
                          "top_logprobs": echo_lp["top_logprobs"] + lp["top_logprobs"],
                          "text_offset": echo_lp["text_offset"] + [o + shift for o in lp["text_offset"]]}
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c["finish_reason"]})
        return {"id": self.request_id, "object": "text_completion", "created": self.created,
                "model": self.served.model_name, "choices": choices, "usage": usage}

    def chunks(self, p: int, out) -> list[dict]:
        self._count(p, out)
        i = self._choice_index(p, out)
        text = out.text
        if self.body.echo and i not in self.choices:
            self.choices[i] = {}
            text = self._echo(p, out)[0] + text
        if not text and not out.finished:
            return []
        lp = self._logprobs(out.token_ids, out.logprobs, 0) if self.body.logprobs is not None else None
        return [{"id": self.request_id, "object": "text_completion", "created": self.created,
                 "model": self.served.model_name,
                 "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}]}]


class _ChatShaper(_Shaper):
    route, chunk_object = "chat", "chat.completion.chunk"

    def stored_prompt(self) -> dict:
        return {"messages": _plain_messages(self.body.messages)}

    def _logprobs(self, tokens: list[int], logprobs: list) -> dict:
        tok = self.served.tokenizer

        def entry(token: int, value: float) -> dict:
            raw = tok.id_to_bytes(token)
            return {"token": raw.decode("utf-8", "replace"), "logprob": value, "bytes": list(raw)}

        return {"content": [{**entry(t, lp[0]), "top_logprobs": [entry(i, v) for i, v in lp[1]]}
                            for t, lp in zip(tokens, logprobs)]}

    def add(self, p: int, out) -> None:
        self._count(p, out)
        choice = self.choices.setdefault(out.index, {"text": "", "tokens": [], "logprobs": [], "finish_reason": None})
        choice["text"] += out.text
        choice["tokens"] += out.token_ids
        choice["logprobs"] += out.logprobs
        choice["finish_reason"] = out.finish_reason

    def response(self, usage: dict) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                    "logprobs": self._logprobs(c["tokens"], c["logprobs"]) if self.body.logprobs else None,
                    "finish_reason": c["finish_reason"]} for i, c in sorted(self.choices.items())]
        return {"id": self.request_id, "object": "chat.completion", "created": self.created,
                "model": self.served.model_name, "choices": choices, "usage": usage}

    def chunks(self, p: int, out) -> list[dict]:
        self._count(p, out)
        chunks = []
        base = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.served.model_name}
        if out.index not in self.choices:  # the first chunk of a choice names the role
            self.choices[out.index] = {}
            chunks.append({**base, "choices": [{"index": out.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
        if out.text or out.finished:
            lp = self._logprobs(out.token_ids, out.logprobs) if self.body.logprobs else None
            delta = {"content": out.text} if out.text else {}
            chunks.append({**base, "choices": [{"index": out.index, "delta": delta, "logprobs": lp,
                                                "finish_reason": out.finish_reason}]})
        return chunks


class _Metrics:
    """Prometheus metrics in the app's own registry (no process-wide state)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "Completed requests", ["route"], registry=self.registry)
        self.errors = Counter("lmforge_errors", "Error responses", ["status"], registry=self.registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter("lmforge_completion_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time to first token", registry=self.registry,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def render(self, stats: dict) -> bytes:
        from prometheus_client import generate_latest

        gauges = "".join(f"# TYPE lmforge_engine_{k} gauge\nlmforge_engine_{k} {v}\n" for k, v in stats.items())
        return generate_latest(self.registry) + gauges.encode()


# ----------------------------------------------------------------------------- assembling a server

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
                 max_pending: int = 256, engine_process: bool = True, **engine_kwargs) -> Served:
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
                  admin_key, feedback)


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

    uvicorn.run(create_app(served), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
