"""Liveness, readiness with `lag_events`, and Prometheus metrics."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition
from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.errors import JSON
from state import keys

router = APIRouter(tags=["health"])


def lag_events(stream_state: dict[bytes, bytes], broker_ends: dict[int, int] | None = None) -> int:
    """Events known to be in the topic but not yet applied.

    What is known: offsets capture saw acknowledged, high watermarks the dataflow fetched, and the
    broker's own end offsets (exact on Kafka; a lower bound on Tansu, docs/measured.md).
    """
    ends: dict[int, int] = dict(broker_ends or {})
    applied: dict[int, int] = {}
    for field, value in stream_state.items():
        name, _, partition = field.decode().partition(":")
        if name == "end":
            ends[int(partition)] = max(ends.get(int(partition), 0), int(value))
        elif name == "applied":
            applied[int(partition)] = int(value)
    return sum(max(0, end - applied.get(p, 0)) for p, end in ends.items())


def broker_end_offsets(consumer: Consumer, topic: str) -> dict[int, int]:
    metadata = consumer.list_topics(topic, timeout=2).topics[topic]
    ends = {}
    for partition in metadata.partitions:
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=2)
        ends[partition] = high
    return ends


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
        stream = state.redis.hgetall(keys.stream(state.settings.topic))
        body["redis"] = True
        body["lag_events"] = lag_events(stream, dict(state.offsets.unrecorded))
        body["dlq_events"] = int(stream.get(b"dlq_events", 0))
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
