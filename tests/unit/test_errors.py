"""Errors no handler took are answered by the application, so the server keeps the connection (no
services: the ASGI application called in-process)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis
from fastapi import FastAPI

from serving.errors import JSON, ServerErrors


def _app() -> FastAPI:
    app = FastAPI(default_response_class=JSON)
    app.add_middleware(ServerErrors)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/redis")
    def redis_away() -> None:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    return app


def _get(app: FastAPI, path: str) -> tuple[int, dict[str, str], Any]:
    """One GET through the ASGI interface; an exception escaping to the server is raised here."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": [], "scheme": "http",
             "server": ("test", 80), "client": ("test", 1), "root_path": ""}

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, orjson.loads(body)


def test_a_bug_is_a_500_answered_by_the_application() -> None:
    status, _, body = _get(_app(), "/boom")
    assert status == 500
    assert body == {"type": "server_error", "code": "error", "detail": "A server error occurred.", "attr": None}


def test_redis_away_is_a_503_with_retry_after() -> None:
    status, headers, body = _get(_app(), "/redis")
    assert status == 503 and headers["retry-after"] == "2"
    assert body["code"] == "service_unavailable" and "Redis is unavailable" in body["detail"]
