"""The event as captured and the normalised event on the topic.

Capture turns what an SDK sent into a `TopicEvent` (PostHog's timestamp rule applied, a uuid
assigned, top-level `$set`/`$set_once` folded into properties). The dataflow parses topic records
back with `parse_topic_event`, which also accepts raw PostHog-shaped events that other producers put
straight onto the topic. Both sides validate with the same rules.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

MAX_EVENT_BYTES = 1024 * 1024
MAX_NAME_LENGTH = 200
_FUTURE_TOLERANCE_MS = 23 * 3600 * 1000
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class InvalidEvent(ValueError):
    """An event that cannot be used; the message is the reason given back or sent to the DLQ."""


# Records and events are made once per event on the dataflow's hot path, so not frozen: a frozen
# dataclass's __init__ sets each field through object.__setattr__ (0.83 us each, 0.22-0.25 us
# without). Nothing mutates or hashes them.
@dataclass(slots=True)
class Record:
    """A record as read from the topic: where it sits, the partition's high watermark when fetched,
    and its bytes (parsed into a `TopicEvent` by the dataflow)."""

    partition: int
    offset: int
    high_watermark: int
    value: bytes
    timestamp_ms: int | None


@dataclass(slots=True)  # not frozen: see Record
class TopicEvent:
    """A validated event, as it travels on the `events` topic."""

    uuid: str
    event: str
    distinct_id: str
    ts_ms: int
    properties: dict[str, Any]
    project_id: int | None = None
    token: str | None = None

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "uuid": self.uuid,
            "event": self.event,
            "distinct_id": self.distinct_id,
            "timestamp": iso_ms(self.ts_ms),
            "properties": self.properties,
        }
        if self.project_id is not None:
            body["project_id"] = self.project_id
        if self.token is not None:
            body["token"] = self.token
        return orjson.dumps(body)

    @property
    def key(self) -> bytes:
        return f"{self.project_id}:{self.distinct_id}".encode()


def iso_ms(ts_ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ts_ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Event times the state can hold. The lower bound is where ClickHouse's DateTime64, PostHog's event
# column, starts; the upper bound stays below 2248, where the funnel attempt rows' packed times
# (`ms << 20`, dataflows/operators/funnel_attempts.py) would leave int64. Every project zone's local
# date of an instant in this range is an ordinary Python date.
EARLIEST_EVENT_MS = -2_208_988_800_000  # 1900-01-01T00:00:00Z
LATEST_EVENT_MS = 7_258_118_400_000 - 1  # 2199-12-31T23:59:59.999Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def in_event_range(ts_ms: int) -> bool:
    return EARLIEST_EVENT_MS <= ts_ms <= LATEST_EVENT_MS


def instant_ms(value: Any, field: str) -> int:
    """An ISO-8601 instant (naive means UTC) or epoch milliseconds, as integer epoch milliseconds.

    Never overflows: any year Python can parse, and any finite number, gives an integer; whether it
    is a usable event time is `in_event_range`'s question.
    """
    if isinstance(value, bool):
        raise InvalidEvent(f"'{field}' must be an ISO-8601 timestamp")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidEvent(f"'{field}' must be a finite number of milliseconds")
        return int(value)
    if not isinstance(value, str) or not value:
        raise InvalidEvent(f"'{field}' must be an ISO-8601 timestamp")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError as exc:
        raise InvalidEvent(f"'{field}' is not a valid ISO-8601 timestamp: {value[:64]!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MS


def _out_of_range(field: str, value: Any) -> str:
    shown = value[:64] if isinstance(value, str) else value
    return (f"'{field}' {shown!r} gives an event time outside 1900-01-01 .. 2199-12-31 (UTC), "
            "the range events can have")


def event_time_ms(raw: dict[str, Any], now_ms: int, sent_at: Any = None) -> int:
    """PostHog's timestamp rule, in integer milliseconds so no input can overflow it.

    `timestamp` is corrected by the clock skew `sent_at` shows (an unparsable `sent_at` is ignored, as
    PostHog does); a non-zero `offset` (ms before now) wins over both; a result more than 23 h in the
    future becomes now. What falls outside the event range is refused (PostHog substitutes now with
    an ingestion warning; refusing tells the sender instead of inventing a time).
    """
    properties = raw.get("properties")
    ignore_sent_at = isinstance(properties, dict) and bool(properties.get("$ignore_sent_at"))
    moment, source = now_ms, "timestamp"
    stamp = raw.get("timestamp")
    if stamp is not None and stamp != "":
        moment = instant_ms(stamp, "timestamp")
        sent = raw.get("sent_at", sent_at)
        if sent is not None and not ignore_sent_at:
            try:
                sent_ms = instant_ms(sent, "sent_at")
            except InvalidEvent:
                sent_ms = None
            # A string is the SDK's clock, however wrong; a number (`_=<ms>` of posthog-js) only
            # when it is a plausible time, since PostHog reads no numbers here at all.
            if sent_ms is not None and (isinstance(sent, str) or in_event_range(sent_ms)):
                moment = now_ms + (moment - sent_ms)
                source = "timestamp (corrected by sent_at)"
    offset = raw.get("offset")
    if offset and not isinstance(offset, bool) and isinstance(offset, int | float):
        if isinstance(offset, float) and (offset != offset or abs(offset) == float("inf")):
            raise InvalidEvent("'offset' must be a finite number of milliseconds")
        moment, source, stamp = now_ms - int(offset), "offset", offset
    if moment - now_ms > _FUTURE_TOLERANCE_MS:
        return now_ms
    if not in_event_range(moment):
        raise InvalidEvent(_out_of_range(source, stamp))
    return moment


def _name(raw: dict[str, Any], field: str) -> str:
    value = raw.get(field)
    if type(value) is str and 0 < len(value) <= MAX_NAME_LENGTH and not value.isspace():
        return value  # the ordinary case, checked first: this runs twice per event
    if isinstance(value, bool) or value is None:
        raise InvalidEvent(f"'{field}' is required")
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidEvent(f"'{field}' must be a string")
    if not value.strip():
        raise InvalidEvent(f"'{field}' must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidEvent(f"'{field}' is longer than {MAX_NAME_LENGTH} characters")
    return value


def _uuid(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidEvent("'uuid' must be a string")
    if _CANONICAL_UUID.fullmatch(value):
        return value
    try:
        return str(uuidlib.UUID(value))
    except ValueError as exc:
        raise InvalidEvent(f"'uuid' is not a valid UUID: {value[:64]!r}") from exc


def _properties(raw: dict[str, Any]) -> dict[str, Any]:
    properties = raw.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, dict):
        raise InvalidEvent("'properties' must be an object")
    properties = dict(properties)
    for field in ("$set", "$set_once"):
        if field in raw and field not in properties:
            properties[field] = raw[field]
    for field in ("$set", "$set_once"):
        if field in properties and not isinstance(properties[field], dict):
            raise InvalidEvent(f"'{field}' must be an object")
    if "$unset" in properties and not isinstance(properties["$unset"], list | dict):
        raise InvalidEvent("'$unset' must be a list of property names")
    return properties


def from_capture(raw: Any, *, project_id: int, now: datetime, sent_at: Any = None) -> TopicEvent:
    """Validate one event of a capture request and normalise it for the topic."""
    if not isinstance(raw, dict):
        raise InvalidEvent("each event must be a JSON object")
    event = _name(raw, "event")
    distinct_id = _distinct_id(raw)
    properties = _properties(raw)
    ts_ms = event_time_ms(raw, (now - _EPOCH) // _MS, sent_at)
    event_uuid = _uuid(raw.get("uuid")) or str(uuidlib.uuid4())
    return TopicEvent(event_uuid, event, distinct_id, ts_ms, properties, project_id)


def _distinct_id(raw: dict[str, Any]) -> str:
    if raw.get("distinct_id") is None and isinstance(raw.get("properties"), dict):
        nested = raw["properties"].get("distinct_id")
        if nested is not None:
            return _name({"distinct_id": nested}, "distinct_id")
    return _name(raw, "distinct_id")


def parse_topic_event(value: bytes, fallback_ts_ms: int | None = None) -> TopicEvent:
    """Parse a record of the `events` topic (ours, or a raw PostHog-shaped event)."""
    if len(value) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event larger than {MAX_EVENT_BYTES} bytes")
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidEvent("an event must be a JSON object")
    event = _name(raw, "event")
    distinct_id = _distinct_id(raw)
    properties = _properties(raw)
    project_id = raw.get("project_id", raw.get("team_id"))
    if project_id is not None and (isinstance(project_id, bool) or not isinstance(project_id, int)):
        raise InvalidEvent("'project_id' must be an integer")
    token = raw.get("token") or raw.get("api_key")
    if project_id is None and not isinstance(token, str):
        raise InvalidEvent("the event names no project: 'project_id' or 'token' is required")
    stamp = raw.get("timestamp")
    if stamp is not None:
        ts_ms = instant_ms(stamp, "timestamp")
    elif fallback_ts_ms is not None:
        ts_ms = fallback_ts_ms
    else:
        raise InvalidEvent("'timestamp' is required")
    if not in_event_range(ts_ms):
        raise InvalidEvent(_out_of_range("timestamp", stamp if stamp is not None else ts_ms))
    event_uuid = _uuid(raw.get("uuid"))
    if event_uuid is None:
        # Deterministic, so a replayed copy of the same record deduplicates.
        event_uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, value.decode("utf-8", "replace")))
    return TopicEvent(event_uuid, event, distinct_id, ts_ms, properties, project_id,
                      token if isinstance(token, str) else None)
