"""PostHog's error JSON (spec §3.1): exactly `type`, `code`, `detail`, `attr`."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import redis
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("insightflow.api")


class ErrorBody(BaseModel):
    """PostHog's error JSON; capture adds `accepted`/`rejected` for partially rejected batches."""

    model_config = ConfigDict(extra="allow")
    type: str
    code: str
    detail: str
    attr: str | None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "Invalid request"), (401, "Invalid credentials"), (403, "Not allowed"), (404, "Not found"),
        (405, "Method not allowed"), (413, "Payload too large"), (429, "Throttled"), (500, "Server error"),
        (503, "A dependency (broker, Redis) is unavailable"))
}
ERROR_RESPONSES.update({
    201: {"description": "Created"}, 202: {"description": "A definition is still being built: "
                                            '{"status": "materializing", "progress": 0..1}'},
    204: {"description": "Deleted"},
})
JSON_BODY = {"requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}}


class JSON(JSONResponse):
    """orjson-encoded JSON (faster than the default encoder; docs/measured.md)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, code: str, detail: str, attr: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status, self.type, self.code, self.detail, self.attr = status, type_, code, detail, attr
        self.headers = headers
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"type": self.type, "code": self.code, "detail": self.detail, "attr": self.attr, **self.extra}


def validation(detail: str, attr: str | None = None, code: str = "invalid_input") -> ApiError:
    return ApiError(400, "validation_error", code, detail, attr)


def not_found(detail: str = "Not found.") -> ApiError:
    return ApiError(404, "invalid_request", "not_found", detail)


async def api_error_handler(_request: Request, exc: Exception) -> JSON:
    assert isinstance(exc, ApiError)
    return JSON(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error_handler(_request: Request, exc: Exception) -> JSON:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        err = not_found()
    elif exc.status_code == 405:
        err = ApiError(405, "invalid_request", "method_not_allowed", "Method not allowed.")
    else:
        err = ApiError(exc.status_code, "invalid_request", "error", str(exc.detail))
    return JSON(err.body(), status_code=err.status)


async def request_validation_handler(_request: Request, exc: Exception) -> JSON:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"msg": "Invalid request.", "loc": ()}
    attr = "__".join(str(p) for p in first.get("loc", ())[1:]) or None
    return JSON(validation(str(first.get("msg")), attr).body(), status_code=400)


def unavailable(detail: str, retry_after: int = 2) -> ApiError:
    return ApiError(503, "server_error", "service_unavailable", detail,
                    headers={"Retry-After": str(retry_after)})


def error_for(exc: Exception) -> ApiError:
    """The answer to an exception no handler took: a dependency that is away is a 503 with
    `Retry-After` (SDKs and dashboards retry); anything else a 500."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return unavailable(f"Redis is unavailable ({exc}). Retry later.")
    return ApiError(500, "server_error", "error", "A server error occurred.")


class ServerErrors:
    """Answers unhandled exceptions itself instead of letting them reach the server.

    Starlette's own last-resort handler re-raises after answering, and uvicorn then drops the
    keep-alive connection without `Connection: close`, so a client's next request on it fails.
    Answered here, the connection stays usable.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise  # too late to answer: the server closes the connection
            err = error_for(exc)
            if err.status == 500:
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            else:
                log.warning("%s %s: %s", scope.get("method"), scope.get("path"), err.detail)
            await JSON(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
