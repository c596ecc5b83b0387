"""Admission: who is calling, may they, how much may their request use, and what did it use.

Everything a request passes before the engine sees it, in one place:

    Gate (ASGI middleware)  authenticates from the Authorization header before a byte of the body is
                            read (an unknown client gets a 401 and costs no parse), then reads the
                            body up to `max_body_bytes` (413 past it, whatever Content-Length said).
    Admission.check_model   the model exists and the key may use it (404 / 403).
    Admission.admit         requests/minute, then the most the request may use (its prompt plus
                            max_tokens per choice) held against the key's lifetime budget and its
                            tokens/minute, so concurrent requests cannot overshoot either (429).
    Admission.settle        what the request used replaces both holds and goes to the usage ledger.
                            A ledger write that fails (database down) is kept and written again with
                            the next one: the ledger is idempotent by request id, so nothing is lost
                            and nothing counted twice; past MAX_UNSETTLED held writes the oldest is
                            dropped, logged and counted.
    Admission.light         requests/minute only, for the cheap routes (/tokenize, /detokenize,
                            /v1/feedback), which otherwise let any key make unbounded work.

A key store or rate limiter that cannot be reached is a 503 with Retry-After (errors.outage).
"""

from __future__ import annotations

import collections
import hmac
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from lmforge.serve.errors import APIError, outage, rate_limited

if TYPE_CHECKING:
    from lmforge.serve.metrics import Metrics
    from lmforge.serve.workers import Served

log = logging.getLogger("lmforge.serve")
DEFAULT_MAX_BODY_BYTES = 4 << 20  # a full 2,048-token context as text or ids is ~20 KB; embeddings lists more
MAX_UNSETTLED = 10_000  # ledger writes held while the database is down


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


def bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _store(fn, *args, **kwargs):
    """A key store or rate limiter call off the event loop; unreachable is a 503."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except Exception as e:
        mapped = outage(e)
        if mapped is None:
            raise
        raise mapped from e


class Admission:
    def __init__(self, served: Served, metrics: Metrics):
        self.served, self.metrics = served, metrics
        self._unsettled: collections.deque[tuple] = collections.deque()

    # -- who -----------------------------------------------------------------------------------

    async def authenticate(self, authorization: str) -> Caller:
        served = self.served
        if served.keys is None:
            return Caller(None)
        token = bearer(authorization)
        if token is None:
            raise APIError(401, "no API key: send 'Authorization: Bearer <key>' (create one with "
                                "`lmforge keys create`)", "authentication_error", code="missing_api_key")
        if served.admin_key is not None and hmac.compare_digest(token.encode(), served.admin_key.encode()):
            return Caller("admin", None)
        record = await _store(served.keys.authenticate, token[:512])
        if record is None:
            raise APIError(401, "invalid API key (unknown or revoked)", "authentication_error", code="invalid_api_key")
        return Caller(record.id, record)

    def check_model(self, name: str | None, who: Caller) -> None:
        served = self.served
        if name is not None and name != served.model_name:
            raise APIError(404, f"model {name[:100]!r} is not served here; this server serves "
                                f"{served.model_name!r}", "not_found_error", "model", "model_not_found")
        if who.record is not None and not who.record.allows(served.model_name):
            raise APIError(403, f"this key may not use model {served.model_name!r}", "permission_error", "model",
                           "model_not_allowed")

    # -- how much ----------------------------------------------------------------------------

    async def light(self, who: Caller) -> None:
        """Requests/minute for a route that runs no model (tokenize, detokenize, feedback)."""
        record = who.record
        if record is not None and self.served.limiter is not None and record.rpm:
            wait = await _store(self.served.limiter.acquire_request, record.id, record.rpm)
            if wait is not None:
                raise rate_limited(f"rate limit of {record.rpm} requests per minute reached", wait)

    async def admit(self, who: Caller, request_id: str, tokens: int) -> None:
        """Rate limits and budget, before any work is queued. `tokens` is the most the request may use
        (its prompts plus max_tokens for each choice); it is held until settle() replaces it."""
        record = who.record
        if record is None:
            return
        served = self.served
        await self.light(who)
        if served.limiter is not None and record.tpm and tokens > record.tpm:
            # no wait would let it through (OpenAI's "request too large")
            raise APIError(429, f"this request may use {tokens} tokens (its prompt plus max_tokens for each "
                                f"choice), more than the key's limit of {record.tpm} tokens per minute; lower "
                                "max_tokens or n", "tokens", code="rate_limit_exceeded")
        held_budget = False
        try:
            if record.token_budget is not None:
                left = await _store(served.keys.reserve_budget, record, request_id, tokens)
                if left is not None:
                    raise APIError(429, f"this request may use {tokens} tokens (its prompt plus max_tokens for "
                                        f"each choice) but the key's token budget of {record.token_budget} has "
                                        f"{left} left (requests in flight included); lower max_tokens or ask for "
                                        "more", "insufficient_quota", code="insufficient_quota")
                held_budget = True
            if served.limiter is not None and record.tpm:
                wait = await _store(served.limiter.reserve_tokens, record.id, record.tpm, tokens, request_id)
                if wait is not None:
                    raise rate_limited(f"rate limit of {record.tpm} tokens per minute reached", wait)
        except BaseException:
            if held_budget:
                await self._release_budget(request_id)
            raise

    async def settle(self, who: Caller, request_id: str, usage: dict, *, ledger: bool = True) -> None:
        """What a request used: settled against its holds and, unless it was refused before it ran
        (ledger=False), billed in the usage ledger. Never raises: it runs as the request ends, often
        in a `finally` of a stream whose client is gone."""
        record, served = who.record, self.served
        if ledger:
            self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
            self.metrics.completion_tokens.inc(usage["completion_tokens"])
        if record is None:
            return
        total = usage["prompt_tokens"] + usage["completion_tokens"]
        if served.limiter is not None and record.tpm:
            try:
                await _store(served.limiter.settle_tokens, record.id, request_id, total)
            except APIError:
                log.warning("could not settle request %s's tokens/minute: the rate limiter is down", request_id)
        if not ledger:
            if record.token_budget is not None:
                await self._release_budget(request_id)
            return
        self._unsettled.append((record.id, served.model_name, request_id, usage["prompt_tokens"],
                                usage["completion_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
        while len(self._unsettled) > MAX_UNSETTLED:
            dropped = self._unsettled.popleft()
            log.error("usage ledger: dropped request %s's usage after %d writes held", dropped[2], MAX_UNSETTLED)
            self.metrics.count_dropped("ledger_backlog_full")
        await self._flush()

    @property
    def num_unsettled(self) -> int:
        return len(self._unsettled)

    async def _flush(self) -> None:
        """Write the held ledger rows, oldest first; stop at the first that fails (kept for next time)."""
        while self._unsettled:
            row = self._unsettled[0]
            try:
                await _store(self.served.keys.record_usage, *row)
            except APIError:
                log.warning("usage ledger unavailable: %d request(s) held to write later", len(self._unsettled))
                return
            except Exception:  # noqa: BLE001 - not an outage: a bad row must not block the rest for ever
                log.exception("usage ledger: could not write request %s's usage", row[2])
                self.metrics.count_dropped("ledger_error")
            if self._unsettled and self._unsettled[0] is row:
                self._unsettled.popleft()

    async def _release_budget(self, request_id: str) -> None:
        try:
            await _store(self.served.keys.release_budget, request_id)
        except APIError:  # the hold expires by itself (RESERVATION_TTL_SECONDS)
            log.warning("could not release request %s's budget hold: the key store is down", request_id)


class Gate:
    """ASGI middleware: authenticate, then bound the body, before FastAPI parses anything."""

    def __init__(self, app, admission: Admission, max_body_bytes: int, public_paths: frozenset[str],
                 count_error=lambda status: None):
        self.app, self.admission, self.max_body_bytes, self.public_paths = app, admission, max_body_bytes, public_paths
        self.count_error = count_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        try:
            if scope["path"] in self.public_paths:
                who = Caller(None)  # nobody in particular: a public route serves anyone alike
            else:
                who = await self.admission.authenticate(headers.get(b"authorization", b"").decode("latin-1"))
            scope.setdefault("state", {})["caller"] = who
            body = await self._read_body(headers, receive)
        except APIError as e:
            self.count_error(e.status)
            return await _send_error(send, e)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _read_body(self, headers: dict, receive) -> bytes:
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes; send "
                                  "less (split the inputs over several requests)", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if not declared.isdigit():
                raise APIError(400, "Content-Length is not a number")
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise APIError(400, "the client went away while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # a chunked body, or one longer than it said: cut while reading
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _send_error(send, e: APIError) -> None:
    import json

    payload = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               *((k.lower().encode(), str(v).encode()) for k, v in e.headers.items())]
    if e.status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
