"""Liveness, readiness with `lag_events`, and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition
from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas.events import iso_ms
from serving.errors import JSON

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSON:
    """Redis and the broker reachable, and how many accepted events are not yet in served state.

    503 with the reason (`redis_error`, `kafka_error`) while a dependency is away; `draining` while
    `insightflow up` is stopping (capture refuses new events, the dataflow applies the rest);
    `topic_recreated` (when, and the topic it replaced) once the dataflow found the events topic new
    under existing state: its offsets start again, and earlier history is read from the archive.
    """
    state = request.app.state
    body: dict[str, object] = {"redis": False, "kafka": False, "lag_events": None}
    progress = None
    try:
        state.offsets.flush()
        unrecorded = state.offsets.snapshot()
        progress = state.stream.progress()
        body["redis"] = True
        body["lag_events"] = progress.lag(unrecorded)
        body["dlq_events"] = progress.dlq_events
        if progress.recreated_at_ms is not None:  # history before it is read from the archive
            body["topic_recreated"] = {"at": iso_ms(progress.recreated_at_ms),
                                       "previous_topic_id": progress.previous_topic_id}
    except Exception as exc:
        body["redis_error"] = f"Redis is unreachable: {exc}"
    try:
        state.producer.producer.list_topics(state.settings.topic, timeout=2)
        body["kafka"] = True
    except Exception as exc:
        body["kafka_error"] = f"the broker is unreachable: {exc}"
    if body["kafka"] and progress is not None and progress.topic_id is not None:
        current = state.topic.current()
        # The topic was recreated and the dataflow has not taken it up yet, or has applied nothing of
        # it yet: nothing in it is applied, and the offsets Redis holds (the old topic's, or ends
        # recorded while the dataflow noticed the new one) could hide some of its events.
        untaken = current is not None and current != progress.topic_id
        if untaken or (progress.recreated_at_ms is not None and not progress.applied):
            try:
                broker = _broker_ends(state)
                body["lag_events"] = broker if untaken else max(int(body["lag_events"] or 0), broker)
            except Exception:  # the broker went away meanwhile: unknown, and not 0
                body["lag_events"] = None
    if state.draining:
        body["draining"] = True
    ready = body["redis"] and body["kafka"]
    return JSON(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "2"})


def _broker_ends(state: Any) -> int:
    """Events in the topic: the sum of its partitions' high watermarks."""
    topic = state.settings.topic
    partitions = state.producer.producer.list_topics(topic, timeout=2).topics[topic].partitions
    return sum(state.watermarks.get_watermark_offsets(TopicPartition(topic, p), timeout=2)[1] for p in partitions)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text"}})
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
