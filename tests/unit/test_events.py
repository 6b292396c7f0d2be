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


NOW_MS = int(NOW.timestamp() * 1000)
MARCH_1_MS = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("fields", "expected_ms"),
    [
        # numbers are epoch milliseconds; more than 23 h ahead becomes now (PostHog's order: the
        # future clamp first, then the range)
        ({"timestamp": 1e20}, NOW_MS),
        ({"timestamp": 1e15}, NOW_MS),
        ({"offset": -1e13}, NOW_MS),                      # the clamp applies to `offset` too
        ({"offset": -23 * 3600 * 1000}, NOW_MS + 23 * 3600 * 1000),  # exactly 23 h ahead is kept
        ({"offset": 0, "timestamp": "2024-03-01T00:00:00Z"}, MARCH_1_MS),
        # an unparsable or implausible numeric sent_at is ignored, as PostHog ignores an invalid one
        ({"timestamp": "2024-03-01T00:00:00Z", "sent_at": 1e19}, MARCH_1_MS),
        ({"timestamp": "2024-03-01T00:00:00Z", "sent_at": "yesterday"}, MARCH_1_MS),
        # a client clock far off, with a consistent sent_at, is corrected to the server's time
        ({"timestamp": "1850-01-01T00:00:00Z", "sent_at": "1850-01-01T00:00:05Z"}, NOW_MS - 5000),
        ({"timestamp": "1900-01-01T00:00:00Z"}, -2_208_988_800_000),
        ({"timestamp": "2199-12-31T23:59:59.999Z", "sent_at": "2199-12-31T23:59:59.999Z"}, NOW_MS),
    ],
)
def test_event_times_that_are_kept(fields: dict, expected_ms: int) -> None:
    event = from_capture({"event": "e", "distinct_id": "d", **fields}, project_id=1, now=NOW)
    assert event.ts_ms == expected_ms
    assert parse_topic_event(event.to_json()).ts_ms == expected_ms  # what capture produces, the dataflow reads


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"timestamp": -1e20}, "'timestamp'"),
        ({"offset": 1e20}, "'offset'"),
        ({"timestamp": "2024-03-01T00:00:00Z", "sent_at": "9999-01-01T00:00:00Z"}, "corrected by sent_at"),
        ({"timestamp": "0001-01-01T00:00:00+14:00"}, "'timestamp'"),
        ({"timestamp": "0001-01-01T00:00:00"}, "'timestamp'"),
        ({"timestamp": "1600-01-01T00:00:00Z"}, "'timestamp'"),
        ({"timestamp": "1899-12-31T23:59:59.999Z"}, "'timestamp'"),
    ],
)
def test_event_times_outside_the_range_are_refused(fields: dict, names: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        from_capture({"event": "e", "distinct_id": "d", **fields}, project_id=1, now=NOW)
    assert names in str(info.value) and "1900-01-01 .. 2199-12-31" in str(info.value)


@pytest.mark.parametrize("stamp", ["1600-01-01T00:00:00Z", "2300-01-01T00:00:00Z", "0001-01-01T00:00:00", -1e20])
def test_topic_events_outside_the_range_are_refused(stamp: object) -> None:
    """Events produced straight onto the topic meet the same range, so the dataflow dead-letters them."""
    raw = orjson.dumps({"event": "e", "distinct_id": "d", "project_id": 1, "timestamp": stamp})
    with pytest.raises(InvalidEvent, match="outside 1900-01-01"):
        parse_topic_event(raw)
    with pytest.raises(InvalidEvent, match="outside 1900-01-01"):
        parse_topic_event(orjson.dumps({"event": "e", "distinct_id": "d", "project_id": 1}), fallback_ts_ms=10**15)
