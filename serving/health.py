"""Liveness, readiness with `lag_events`, and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.errors import JSON

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSON:
    """Redis and the broker reachable, and how many accepted events are not yet in served state.

    503 with the reason (`redis_error`, `kafka_error`) while a dependency is away; `draining` while
    `insightflow up` is stopping (capture refuses new events, the dataflow applies the rest).
    """
    state = request.app.state
    body: dict[str, object] = {"redis": False, "kafka": False, "lag_events": None}
    try:
        state.offsets.flush()
        progress = state.stream.progress()
        body["redis"] = True
        body["lag_events"] = progress.lag(dict(state.offsets.unrecorded))
        body["dlq_events"] = progress.dlq_events
    except Exception as exc:
        body["redis_error"] = f"Redis is unreachable: {exc}"
    try:
        state.producer.producer.list_topics(state.settings.topic, timeout=2)
        body["kafka"] = True
    except Exception as exc:
        body["kafka_error"] = f"the broker is unreachable: {exc}"
    if state.draining:
        body["draining"] = True
    ready = body["redis"] and body["kafka"]
    return JSON(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "2"})


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text"}})
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
