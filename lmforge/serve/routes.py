"""The routes: each validates its body (schemas.py), passes admission (admission.py) and hands the
work to generation.py or a store. Thin on purpose: what a route decides is which checks apply."""

from __future__ import annotations

import base64
import contextlib
import struct
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from lmforge.common import LmforgeError
from lmforge.serve.admission import Admission, Caller, Gate
from lmforge.serve.errors import APIError, install_handlers
from lmforge.serve.generation import check_length, engine_error, prompts_of, render_chat, respond, sampling
from lmforge.serve.metrics import Metrics
from lmforge.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    FeedbackRequest,
    KeyCreateRequest,
    TokenizeRequest,
)
from lmforge.serve.shapes import ChatShaper, CompletionShaper
from lmforge.serve.workers import Served


def create_app(served: Served) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine.attach()  # worker processes are watched (and restarted) from now on
        yield
        await served.engine.shutdown()  # uvicorn has let in-flight requests finish; stop the workers

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.served = served
    metrics = Metrics()
    admission = Admission(served, metrics)
    app.state.admission = admission
    install_handlers(app, metrics.count_error)
    public = {"/health"} | ({"/metrics"} if served.public_metrics else set())
    app.add_middleware(Gate, admission=admission, max_body_bytes=served.max_body_bytes, public_paths=frozenset(public),
                       count_error=metrics.count_error)

    async def caller(request: Request) -> Caller:
        """Who the gate authenticated. Fails closed: a route reached without the gate's verdict on a
        server with keys answers 401, never as an open server would."""
        who = request.scope.get("state", {}).get("caller")
        if who is None:
            if served.keys is not None:
                raise APIError(401, "no API key: send 'Authorization: Bearer <key>'", "authentication_error",
                               code="missing_api_key")
            who = Caller(None)
        return who

    async def admin(who: Caller = Depends(caller)) -> Caller:
        if served.keys is None:
            raise APIError(404, "key management needs a key store; start the server without --no-auth",
                           "not_found_error")
        if not who.admin:
            raise APIError(403, "this route needs an admin key", "permission_error", code="not_admin")
        return who

    def check_store(param: str | None) -> None:
        if served.feedback is None:
            raise APIError(400, "this server keeps no responses: it runs without a database (--no-auth); restart "
                                "it without --no-auth to use store and /v1/feedback", param=param,
                           code="store_unavailable")

    @app.get("/health")
    async def health():
        """200 while a worker can serve (a load balancer's check), 503 once none can."""
        workers = served.workers
        alive = sum(w.alive for w in workers)
        body = {"status": "ok" if alive == len(workers) else "degraded" if alive else "unavailable",
                "model": served.model_name, "workers": {"running": alive, "total": len(workers)}}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_route(who: Caller = Depends(caller)):
        if not served.public_metrics and served.keys is not None and not who.admin:
            raise APIError(403, "/metrics needs an admin key (or start the server with --public-metrics)",
                           "permission_error", code="not_admin")
        extra = {"ledger_unsettled": admission.num_unsettled}
        return Response(metrics.render(served.engine.stats(), extra), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(who: Caller = Depends(caller)):
        visible = who.record is None or who.record.allows(served.model_name)
        data = [{"id": served.model_name, "object": "model", "created": served.created, "owned_by": "lmforge",
                 "max_model_len": served.context}] if visible else []
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def model(name: str, who: Caller = Depends(caller)):
        admission.check_model(name, who)
        return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "lmforge"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, who: Caller = Depends(caller)):
        admission.check_model(body.model, who)
        prompts = prompts_of(body.prompt, served)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported (use n)", param="best_of")
        params = sampling(body, served, max_tokens=16 if body.max_tokens is None else body.max_tokens,
                          logprobs=body.logprobs,
                          prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None)
        for ids in prompts:
            check_length(ids, params, served)
        if body.store:
            check_store("store")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        await admission.admit(who, request_id, sum(len(ids) + params.max_tokens * params.n for ids in prompts))
        shaper = CompletionShaper(served, body, prompts, request_id)
        return await respond(served, request, who, body, prompts, params, request_id, shaper, admission, metrics)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request, who: Caller = Depends(caller)):
        admission.check_model(body.model, who)
        ids = render_chat(served, body.messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = sampling(body, served, max_tokens=limit, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        end = getattr(served.tokenizer, "special_ids", {}).get("<|assistant_end|>")
        if end is not None:
            params.stop_token_ids = [*params.stop_token_ids, end]
        check_length(ids, params, served)
        if body.store:
            check_store("store")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        await admission.admit(who, request_id, len(ids) + params.max_tokens * params.n)
        shaper = ChatShaper(served, body, request_id)
        return await respond(served, request, who, body, [ids], params, request_id, shaper, admission, metrics)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, who: Caller = Depends(caller)):
        admission.check_model(body.model, who)
        if body.dimensions is not None:
            raise APIError(400, "dimensions is not supported: embeddings have the model's width", param="dimensions")
        inputs = prompts_of(body.input, served, name="input")
        for i, ids in enumerate(inputs):
            if len(ids) > served.context:
                raise APIError(400, f"input {i} has {len(ids)} tokens; the model's context is {served.context}",
                               param="input", code="context_length_exceeded")
        request_id = f"embd-{uuid.uuid4().hex}"
        n = sum(len(ids) for ids in inputs)
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}
        await admission.admit(who, request_id, n)
        data = []
        try:
            for i, ids in enumerate(inputs):
                try:
                    vector = await served.engine.embed(ids)
                except LmforgeError as e:
                    raise engine_error(e) from e
                usage["prompt_tokens"] += len(ids)
                if body.encoding_format == "base64":
                    vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "index": i, "embedding": vector})
        finally:  # what was embedded is billed, whether or not the rest failed
            await admission.settle(who, request_id, usage)
        return {"object": "list", "data": data, "model": served.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, who: Caller = Depends(caller)):
        admission.check_model(body.model, who)
        await admission.light(who)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            ids = render_chat(served, body.messages)
        else:
            encode = served.tokenizer.encode_with_special if body.add_special_tokens else served.tokenizer.encode
            ids = encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, who: Caller = Depends(caller)):
        admission.check_model(body.model, who)
        await admission.light(who)
        bad = [t for t in body.tokens if not 0 <= t < served.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary 0..{served.tokenizer.vocab_size - 1}",
                           param="tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, who: Caller = Depends(caller)):
        await admission.light(who)
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


def _key_json(record) -> dict:
    return {"id": record.id, "name": record.name, "models": record.models, "rpm": record.rpm, "tpm": record.tpm,
            "token_budget": record.token_budget, "admin": record.admin}
