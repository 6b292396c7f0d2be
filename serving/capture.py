"""Capture endpoints as the PostHog SDKs call them: `/batch/`, `/capture/`, `/e/`, `/i/v0/e/`.

A request is answered `200 {"status": 1}` only after the broker acknowledged every accepted event.
Bodies may be JSON, gzip (header or `compression=gzip-js`), or form-encoded `data=` (base64 or
plain JSON). A batch with some invalid events keeps the valid ones and answers 400 naming the
rejected ones, so nothing good is lost and the SDK does not resend.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import threading
import zlib
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import orjson
import redis
from confluent_kafka import KafkaError, Producer
from fastapi import APIRouter, Request
from prometheus_client import Counter

from schemas.events import MAX_EVENT_BYTES, InvalidEvent, from_capture
from serving.errors import JSON, ApiError
from state.registry import ProjectCache
from state.stream import Stream

log = logging.getLogger("insightflow.capture")
MAX_BODY_BYTES = 20 * 1024 * 1024
CAPTURED = Counter("insightflow_captured_events", "Events accepted by capture and acknowledged by the broker")
REJECTED = Counter("insightflow_rejected_events", "Events rejected by capture")

router = APIRouter(tags=["capture"])


def _invalid(detail: str, attr: str | None = None, **extra: Any) -> ApiError:
    return ApiError(400, "validation_error", "invalid_payload", detail, attr, extra=extra)


class EventProducer:
    """A batching Kafka producer whose deliveries resolve asyncio futures."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = Producer({
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,  # batches for the broker (docs/measured.md), at little cost in latency
            "batch.num.messages": 10_000,
            "compression.type": "lz4",
            "message.timeout.ms": 5000,
            "enable.idempotence": False,
        })
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="capture-producer", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    async def send(self, records: list[tuple[bytes, bytes]]) -> dict[int, int]:
        """Produce encoded (key, value) records and wait for every acknowledgement; returns partition
        -> next offset reached. Nothing here can fail because of an event: they were all encoded
        before the first was produced, so only the broker can make a batch fail."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        delivery = _Delivery(len(records), loop, done)
        for key, value in records:
            while True:
                try:
                    self.producer.produce(self.topic, key=key, value=value, on_delivery=delivery.delivered)
                    break
                except BufferError:
                    await asyncio.sleep(0.01)
        error, ends = await done
        if error is not None:
            raise ApiError(503, "server_error", "broker_unavailable",
                           f"The event broker did not acknowledge the events: {error.str()}. Retry later.",
                           headers={"Retry-After": "2"})
        return ends

    def close(self) -> None:
        self._stop.set()
        self.producer.flush(5)


def _encoded(raw: Any, project_id: int, now: datetime, sent_at: Any) -> tuple[bytes, bytes]:
    """One event of a request, validated and encoded for the topic; InvalidEvent names what is wrong."""
    try:
        if len(orjson.dumps(raw)) > MAX_EVENT_BYTES:
            raise InvalidEvent(f"event larger than {MAX_EVENT_BYTES} bytes")
        event = from_capture(raw, project_id=project_id, now=now, sent_at=sent_at)
        return event.key, event.to_json()
    except InvalidEvent:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # orjson's encode errors included
        raise InvalidEvent(f"unusable event: {exc}") from exc


class AcknowledgedOffsets:
    """End offsets the broker acknowledged to capture, recorded in Redis for `/readyz`'s lag.

    Recording happens after the answer is decided, on a thread of its own: an event the broker
    acknowledged is accepted whatever Redis does, and a capture never waits on a Redis busy with a
    heavy query. Until recorded (Redis slow or unreachable) the ends wait here, and `/readyz`, which
    flushes them itself, counts them.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.unrecorded: dict[int, int] = {}
        self._lock = threading.Lock()
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._record, name="capture-offsets", daemon=True)
        self._thread.start()

    def acknowledged(self, ends: dict[int, int]) -> None:
        with self._lock:
            for partition, end in ends.items():
                self.unrecorded[partition] = max(self.unrecorded.get(partition, 0), end)
        self._pending.set()

    def _record(self) -> None:
        while not self._stop.is_set():
            self._pending.wait(0.5)  # woken by a capture; otherwise a retry while Redis was away
            self._pending.clear()
            self.flush()

    def snapshot(self) -> dict[int, int]:
        """The ends not yet recorded. Taken before reading the recorded ones, it misses nothing: an
        end leaves here only once Redis has it."""
        with self._lock:
            return dict(self.unrecorded)

    def flush(self) -> None:
        with self._lock:
            pending = dict(self.unrecorded)
        if not pending:
            return
        try:
            self.stream.record({}, pending)
        except redis.RedisError:
            return
        with self._lock:
            for partition, end in pending.items():
                if self.unrecorded.get(partition) == end:
                    del self.unrecorded[partition]

    def close(self) -> None:
        """Record what is left (a stop that drains relies on it), then end the thread."""
        self._stop.set()
        self._pending.set()
        self._thread.join(5)
        self.flush()


class _Delivery:
    """The broker's acknowledgements of one request's records, gathered on the producer's poll thread
    and handed to the event loop once, when the last arrives. One cross-thread wake-up per record
    floods the loop's self-pipe under load, and a full self-pipe drops signals too."""

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        self.left, self.loop, self.done = count, loop, done
        self.error: KafkaError | None = None
        self.ends: dict[int, int] = {}
        self._lock = threading.Lock()

    def delivered(self, err: KafkaError | None, msg: Any) -> None:
        with self._lock:
            if err is not None:
                self.error = self.error or err
            else:
                partition, end = msg.partition(), msg.offset() + 1
                if end > self.ends.get(partition, 0):
                    self.ends[partition] = end
            self.left -= 1
            last = self.left == 0
        if last:
            self.loop.call_soon_threadsafe(_settle, self.done, (self.error, self.ends))


def _settle(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _decompress(body: bytes, encoding: str, compression: str) -> bytes:
    if "gzip" in encoding or compression == "gzip-js" or compression == "gzip" or body[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as exc:
            raise _invalid(f"Malformed request data: the body is not valid gzip ({exc}).") from exc
    if compression and compression not in ("", "base64"):
        raise _invalid(f"Malformed request data: unsupported compression '{compression}'.")
    return body


def _json_payload(data: bytes) -> Any:
    text = data.strip()
    if not text:
        raise _invalid("Malformed request data: the body is empty.")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        first = exc
    try:
        decoded = base64.b64decode(text + b"=" * (-len(text) % 4), validate=False)
        return orjson.loads(decoded)
    except (ValueError, orjson.JSONDecodeError):  # not base64 either: say what was wrong with the JSON
        raise _invalid(f"Malformed request data: the body is not valid JSON ({first}).") from first


async def read_payload(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, "validation_error", "payload_too_large",
                       f"Request body larger than {MAX_BODY_BYTES} bytes.")
    compression = request.query_params.get("compression", "")
    content_type = request.headers.get("content-type", "")
    if "application/x-www-form-urlencoded" in content_type or (not body and "data" in request.query_params):
        form = parse_qs(body.decode("latin-1")) if body else {}
        data = (form.get("data") or [request.query_params.get("data", "")])[0]
        compression = (form.get("compression") or [compression])[0]
        raw = data.encode("latin-1")
        if compression == "gzip-js":
            raw = base64.b64decode(raw + b"=" * (-len(raw) % 4))
        body = raw
    body = _decompress(body, request.headers.get("content-encoding", "").lower(), compression)
    return _json_payload(body)


def _split(payload: Any) -> tuple[list[Any], dict[str, Any]]:
    """The events of a payload and its envelope (token, sent_at)."""
    if isinstance(payload, list):
        return payload, {}
    if not isinstance(payload, dict):
        raise _invalid("Malformed request data: expected a JSON object or list.")
    if "batch" in payload:
        if not isinstance(payload["batch"], list):
            raise _invalid("Malformed request data: 'batch' must be a list of events.", "batch")
        return payload["batch"], payload
    if "data" in payload and isinstance(payload["data"], list | dict):
        inner = payload["data"]
        return (inner if isinstance(inner, list) else [inner]), payload
    return [payload], payload


def _token(request: Request, envelope: dict[str, Any], events: list[Any]) -> str | None:
    for source in (envelope, request.query_params):
        for name in ("api_key", "token"):
            value = source.get(name)
            if isinstance(value, str) and value:
                return value
    for event in events:
        if isinstance(event, dict):
            for name in ("api_key", "token"):
                if isinstance(event.get(name), str) and event[name]:
                    return event[name]
            props = event.get("properties")
            if isinstance(props, dict) and isinstance(props.get("token"), str) and props["token"]:
                return props["token"]
    return None


@router.post("/batch/", operation_id="capture_batch")
@router.post("/batch", include_in_schema=False)
@router.post("/capture/", operation_id="capture_capture")
@router.post("/capture", include_in_schema=False)
@router.post("/e/", operation_id="capture_e")
@router.post("/e", include_in_schema=False)
@router.get("/e/", operation_id="capture_e_get")
@router.post("/i/v0/e/", operation_id="capture_i_v0_e")
@router.post("/i/v0/e", include_in_schema=False)
@router.post("/track/", operation_id="capture_track")
async def capture(request: Request) -> JSON:
    """Accept events from any PostHog SDK."""
    if request.app.state.draining:
        raise ApiError(503, "server_error", "draining",
                       "Insightflow is stopping and accepts no more events. Retry later.",
                       headers={"Retry-After": "5"})
    now = datetime.now(UTC)
    payload = await read_payload(request)
    raw_events, envelope = _split(payload)
    token = _token(request, envelope, raw_events)
    if not token:
        raise ApiError(401, "authentication_error", "invalid_api_key",
                       "API key not provided. You can find your project API key in PostHog project settings.")
    projects: ProjectCache = request.app.state.projects
    project = projects.by_token(token)
    if project is None:
        raise ApiError(401, "authentication_error", "invalid_api_key",
                       "Project API key invalid. You can find your project API key in PostHog project settings.")
    if not raw_events:
        raise _invalid("Invalid payload: no events in the request.")
    sent_at = envelope.get("sent_at")
    if sent_at is None and request.query_params.get("_", "").isdigit():
        sent_at = int(request.query_params["_"])
    accepted: list[tuple[bytes, bytes]] = []
    rejected: list[dict[str, Any]] = []
    for index, raw in enumerate(raw_events):
        try:
            accepted.append(_encoded(raw, project.id, now, sent_at))
        except InvalidEvent as exc:
            rejected.append({"index": index, "detail": str(exc)})
    if accepted:
        state = request.app.state
        try:
            ends = await state.producer.send(accepted)
        except ApiError:
            raise
        except Exception as exc:
            log.exception("produce failed")
            raise ApiError(503, "server_error", "broker_unavailable",
                           f"The event broker is unavailable: {exc}. Retry later.",
                           headers={"Retry-After": "2"}) from exc
        state.offsets.acknowledged(ends)
        CAPTURED.inc(len(accepted))
    if rejected:
        REJECTED.inc(len(rejected))
        first = rejected[0]
        if len(raw_events) == 1:
            status = 413 if "larger than" in first["detail"] else 400
            raise ApiError(status, "validation_error", "invalid_payload", f"Invalid payload: {first['detail']}.")
        raise _invalid(
            f"Invalid payload: {len(rejected)} of {len(raw_events)} events rejected "
            f"(event {first['index']}: {first['detail']}); the other {len(accepted)} were accepted.",
            f"batch__{first['index']}", accepted=len(accepted), rejected=rejected)
    return JSON({"status": 1})
