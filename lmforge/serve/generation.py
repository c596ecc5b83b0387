"""A request's way through the engine: its prompts as token ids, its sampling fields as
SamplingParams, the run itself, and the answer as one JSON body or server-sent events.

Checks that depend on the model (vocabulary, context, the KV pool) are made here, before anything
is queued, so the engine only sees requests it can run: each is a 400 naming the field.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from lmforge.common import LmforgeError
from lmforge.conversations import encode_chat
from lmforge.engine.async_engine import EngineError, Overloaded
from lmforge.engine.sequence import SamplingParams
from lmforge.serve.errors import APIError, log, outage
from lmforge.serve.schemas import TextPart

if TYPE_CHECKING:
    from lmforge.serve.admission import Caller
    from lmforge.serve.workers import Served


def prompts_of(prompt, served: Served, name: str = "prompt") -> list[list[int]]:
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
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary 0..{served.tokenizer.vocab_size - 1}",
                           param=name)
        out.append(ids)
    return out


def plain_messages(messages) -> list[dict]:
    """The messages as the chat template sees them: role and text content."""
    plain = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):  # content parts: only text is understood
            for part in content:
                if isinstance(part, TextPart):
                    continue
                what = ("a text part needs 'text', a string" if part.type == "text" else
                        f"a {part.type[:40]!r} part; this model reads only text parts "
                        "({'type': 'text', 'text': ...})")
                raise APIError(400, f"messages[{i}].content: {what}", param=f"messages.{i}.content",
                               code="unsupported_content")
            content = "".join(part.text for part in content)
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return plain


def render_chat(served: Served, messages) -> list[int]:
    template = getattr(served.tokenizer, "chat_template", None)
    if not template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages",
                       code="no_chat_template")
    plain = plain_messages(messages)
    if not any(m["content"] for m in plain):
        raise APIError(400, "every message is empty; say something", param="messages")
    try:
        return encode_chat(served.tokenizer, plain, template)  # markers typed by the user stay text
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception, or a message it cannot render
        raise APIError(400, f"the chat template cannot render these messages: {str(e)[:300]}",
                       param="messages") from e


def sampling(body, served: Served, *, max_tokens: int | None, logprobs: int | None = None,
             prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's sampling fields as SamplingParams; max_tokens None means "up to the context",
    settled per prompt by check_length."""
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


def check_length(ids: list[int], params: SamplingParams, served: Served) -> None:
    """The prompt and max_tokens fit the context, and all n choices fit the KV pool at once."""
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
    need = params.n * (len(ids) + params.max_tokens)
    if served.kv_tokens is not None and need > served.kv_tokens:
        raise APIError(400, f"n={params.n} choices of up to {len(ids) + params.max_tokens} tokens each need "
                            f"{need} tokens of KV cache; a worker holds {served.kv_tokens}; lower n or max_tokens",
                       param="n", code="context_length_exceeded")


def engine_error(e: LmforgeError) -> APIError:
    if isinstance(e, Overloaded):
        return APIError(503, str(e), "server_error", code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, EngineError):
        return APIError(500, str(e), "server_error")
    return APIError(400, str(e))


async def respond(served: Served, request, who: Caller, body, prompts, params, request_id, shaper, admission,
                  metrics):
    """Run every prompt through the engine; stream events or gather one JSON answer. A finished
    response whose request said `store: true` is kept for /v1/feedback."""
    started = time.perf_counter()

    async def outputs() -> AsyncIterator[tuple[int, Any]]:
        # Several prompts (completions' list form) run one after another per request, each streamed.
        for p, ids in enumerate(prompts):
            try:
                gen = served.engine.generate(ids, params, request_id=f"{request_id}-{p}", salt=who.salt)
                async for out in gen:
                    yield p, out
            except LmforgeError as e:
                raise engine_error(e) from e

    async def keep() -> None:
        await run_in_threadpool(served.feedback.store_response, shaper.request_id, who.key_id, served.model_name,
                                shaper.texts(), **shaper.stored_prompt())

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = outputs()
        try:  # the first output, so that a refusal (503, 400) is still an HTTP status, not a broken stream
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await admission.settle(who, request_id, shaper.usage(), ledger=False)  # refused: free its holds
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
                    await keep()
                yield "data: [DONE]\n\n"
                metrics.requests.labels(shaper.route).inc()
            except APIError as e:
                metrics.errors.labels(str(e.status)).inc()
                yield f"data: {json.dumps(e.body())}\n\n"
            except Exception as e:  # noqa: BLE001 - the stream has begun: say so in it, never cut it silently
                mapped = outage(e) or APIError(500, "internal server error", "server_error")
                if mapped.status == 500:
                    log.exception("internal error in a stream of %s", shaper.route)
                metrics.errors.labels(str(mapped.status)).inc()
                yield f"data: {json.dumps(mapped.body())}\n\n"
            finally:
                # A client that went away lands here with this task cancelled: shielded, its generation
                # is still aborted (aclose) and the tokens made for it still reach the ledger, once.
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                    await admission.settle(who, request_id, shaper.usage())

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
            await admission.settle(who, request_id, shaper.usage(), ledger=False)  # refused or failed: not billed
        raise
    finally:
        await stream.aclose()  # aborts the generation if it has not finished
    usage = shaper.usage()
    await admission.settle(who, request_id, usage)  # what was generated is billed, answered or not
    if not shaper.finished:
        return Response(status_code=499)  # nginx's "client closed request"
    if body.store:
        await keep()
    metrics.requests.labels(shaper.route).inc()
    return shaper.response(usage)

