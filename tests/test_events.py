"""Capture normalisation and topic parsing (no services)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from schemas.events import InvalidEvent, from_capture, parse_topic_event

NOW = datetime(2024, 3, 7, 12, 0, tzinfo=UTC)


def test_timestamp_rules() -> None:
    plain = from_capture({"event": "e", "distinct_id": "d", "timestamp": "2024-03-01T00:00:00Z"},
                         project_id=1, now=NOW)
    assert plain.ts_ms == int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)
    skewed = from_capture({"event": "e", "distinct_id": "d", "timestamp": "2024-03-07T13:00:00Z"}, project_id=1,
                          now=NOW, sent_at="2024-03-07T14:00:00Z")
    assert skewed.ts_ms == int(datetime(2024, 3, 7, 11, 0, tzinfo=UTC).timestamp() * 1000)
    offset = from_capture({"event": "e", "distinct_id": "d", "offset": 60_000}, project_id=1, now=NOW)
    assert offset.ts_ms == int(NOW.timestamp() * 1000) - 60_000
    missing = from_capture({"event": "e", "distinct_id": 42}, project_id=1, now=NOW)
    assert missing.ts_ms == int(NOW.timestamp() * 1000) and missing.distinct_id == "42"
    future = from_capture({"event": "e", "distinct_id": "d", "timestamp": "2024-03-09T12:00:00Z"}, project_id=1,
                          now=NOW)
    assert future.ts_ms == int(NOW.timestamp() * 1000)


def test_set_folding_and_uuid() -> None:
    raw = {"event": "$identify", "distinct_id": "d", "$set": {"a": 1}, "uuid": "0190a8c4-bd2f-7000-8000-000000000001"}
    event = from_capture(raw, project_id=3, now=NOW)
    assert event.properties["$set"] == {"a": 1} and event.uuid == "0190a8c4-bd2f-7000-8000-000000000001"
    assert event.key == b"3:d"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"distinct_id": "d"}, "'event' is required"),
        ({"event": "", "distinct_id": "d"}, "must not be empty"),
        ({"event": "e"}, "'distinct_id' is required"),
        ({"event": "e", "distinct_id": {"x": 1}}, "'distinct_id' must be a string"),
        ({"event": "e", "distinct_id": "d", "properties": []}, "'properties' must be an object"),
        ({"event": "e", "distinct_id": "d", "timestamp": "soon"}, "not a valid ISO-8601"),
        ({"event": "e", "distinct_id": "d", "uuid": "nope"}, "not a valid UUID"),
        ({"event": "e" * 201, "distinct_id": "d"}, "longer than 200"),
        ({"event": "e", "distinct_id": "d", "$set": "x"}, "'$set' must be an object"),
    ],
)
def test_invalid_events(raw: dict, needle: str) -> None:
    with pytest.raises(InvalidEvent, match=None) as info:
        from_capture(raw, project_id=1, now=NOW)
    assert needle in str(info.value)


def test_topic_round_trip_and_raw_producers() -> None:
    event = from_capture({"event": "e", "distinct_id": "d", "timestamp": "2024-03-01T00:00:00Z"}, project_id=1, now=NOW)
    again = parse_topic_event(event.to_json())
    assert again == event
    raw = orjson.dumps({"event": "e", "distinct_id": "d", "token": "phc_x"})
    first, second = parse_topic_event(raw, 1_700_000_000_000), parse_topic_event(raw, 1_700_000_000_000)
    assert first.uuid == second.uuid  # deterministic: a replayed copy deduplicates
    assert first.token == "phc_x" and first.project_id is None and first.ts_ms == 1_700_000_000_000
    with pytest.raises(InvalidEvent, match="names no project"):
        parse_topic_event(orjson.dumps({"event": "e", "distinct_id": "d", "timestamp": "2024-03-01T00:00:00Z"}))
    with pytest.raises(InvalidEvent, match="'project_id' must be an integer"):
        parse_topic_event(orjson.dumps({"event": "e", "distinct_id": "d", "project_id": "1"}))
