"""Pure operators: person updates, trend buckets, record validation."""

from __future__ import annotations

from datetime import UTC, datetime

from dataflows.operators.persons import person_update
from dataflows.operators.trends import trend_buckets
from dataflows.operators.validate import parse_record
from schemas.dates import zone
from schemas.events import Record, from_capture

NOW = datetime(2024, 3, 7, 12, 0, tzinfo=UTC)


def _event(raw: dict):
    return from_capture({"distinct_id": "d", "timestamp": "2024-03-07T01:00:00Z", **raw}, project_id=1, now=NOW)


def test_identify_alias_merge_links() -> None:
    identify = person_update(_event({"event": "$identify", "properties": {"$anon_distinct_id": "anon",
                                                                           "$set": {"email": "a@b"}}}))
    assert (identify.link_kind, identify.other_distinct_id, identify.set) == ("identify", "anon", {"email": "a@b"})
    alias = person_update(_event({"event": "$create_alias", "properties": {"alias": "other"}}))
    assert (alias.link_kind, alias.other_distinct_id) == ("alias", "other")
    merge = person_update(_event({"event": "$merge_dangerously", "properties": {"alias": "x"}}))
    assert merge.link_kind == "merge"
    self_link = person_update(_event({"event": "$identify", "properties": {"$anon_distinct_id": "d"}}))
    assert self_link.link_kind is None
    plain = person_update(_event({"event": "$pageview", "properties": {"$set_once": {"a": 1}, "$unset": ["b"]}}))
    assert plain.link_kind is None and plain.set_once == {"a": 1} and plain.unset == ["b"]


def test_trend_buckets_follow_project_zone() -> None:
    event = _event({"event": "e"})
    utc = trend_buckets(event, zone("UTC"))
    pacific = trend_buckets(event, zone("US/Pacific"))
    assert utc.day == "20240307" and pacific.day == "20240306"
    assert utc.hour == int(datetime(2024, 3, 7, 1, tzinfo=UTC).timestamp()) == pacific.hour


def test_parse_record_never_raises() -> None:
    bad = parse_record(Record(0, 5, 6, b"\xff\xfe", None))
    assert bad.event is None and "JSON" in (bad.reason or "")
    good = parse_record(Record(0, 6, 7, _event({"event": "e"}).to_json(), None))
    assert good.event is not None and good.event.event == "e" and good.reason is None
