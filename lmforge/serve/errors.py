"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the status codes
clients act on: 400 bad request, 401 no or unknown key, 403 not allowed, 404 unknown model or
route, 413 body too large, 429 rate or quota (Retry-After), 503 overloaded or a store down
(Retry-After). A 500 is a bug of ours; it is logged with its traceback and counted.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lmforge.serve")
OUTAGE_RETRY_SECONDS = 5


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def rate_limited(message: str, wait: float) -> APIError:
    seconds = max(1, int(wait + 0.999))
    return APIError(429, f"{message}; retry in {seconds} s", "rate_limit_exceeded", code="rate_limit_exceeded",
                    headers={"Retry-After": str(seconds)})


def outage(e: BaseException) -> APIError | None:
    """The 503 for a key store or rate limiter that cannot be reached (database or Redis down,
    pool exhausted), or None for any other exception. The client should retry, not be told it is
    at fault (4xx) nor that the server broke (500)."""
    import sqlalchemy.exc as sa_exc

    kinds: tuple[type, ...] = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                               sa_exc.TimeoutError)
    try:
        import redis.exceptions as redis_exc

        kinds += (redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.BusyLoadingError)
    except ImportError:  # redis is a dependency, but an outage check must never fail itself
        pass
    if not isinstance(e, kinds):
        return None
    which = "rate limiter (Redis)" if type(e).__module__.startswith("redis") else "key store (database)"
    return APIError(503, f"the server's {which} is unavailable; retry in {OUTAGE_RETRY_SECONDS} s",
                    "server_error", code="store_unavailable", headers={"Retry-After": str(OUTAGE_RETRY_SECONDS)})


def install_handlers(app: FastAPI, count_error) -> None:
    """Every error the app raises answered in OpenAI's shape; `count_error(status)` counts it."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        count_error(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

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
        count_error(400)
        return JSONResponse(error_body(message[:1000], "invalid_request_error", ".".join(loc)[:200] or None,
                                       "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = str(e.detail)
        if e.status_code == 400 and "parsing the body" in message:  # undecodable bytes, e.g. invalid UTF-8
            message = "the request body could not be read as JSON (is it UTF-8?); send a UTF-8 JSON object"
        count_error(e.status_code)
        return JSONResponse(error_body(message, kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        mapped = outage(e)
        if mapped is not None:
            log.warning("%s on %s: %s", mapped.message, request.url.path, type(e).__name__)
            return await _api_error(request, mapped)
        log.exception("internal error on %s", request.url.path)
        count_error(500)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
