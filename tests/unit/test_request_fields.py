"""Request parameters at their edges: each refused with a 400-worthy error naming it (no services)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.dates import DateParseError, QueryDateRange, relative_date_parse, zone
from schemas.errors import RequestError
from schemas.fields import int_field, list_field, nesting
from schemas.funnels import parse_funnel_request
from schemas.paths import parse_paths_request
from schemas.retention import parse_retention_request
from schemas.trends import parse_trends_request

UTC_ZONE = zone("UTC")
NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)
TWO_STEPS = [{"id": "a", "order": 0}, {"id": "b", "order": 1}]


@pytest.mark.parametrize(("value", "ok"), [(5, 5), ("7", 7), (3.0, 3), (0, None), (-1, None), (10**12, None),
                                           ("NaN", None), ("*", None), (True, None), ([1], None), (2.5, None)])
def test_integers_with_bounds(value: Any, ok: int | None) -> None:
    if ok is not None:
        assert int_field({"n": value}, "n", None, 1, 100) == ok
    else:
        with pytest.raises(RequestError) as info:
            int_field({"n": value}, "n", None, 1, 100)
        assert info.value.attr == "n" and "from 1 to 100" in info.value.detail


@pytest.mark.parametrize("text", ["-10000000000d", "9999-12-31", "0001-01-02", "2026-11-15Tgarbage",
                                  "2026-11-15T25:99:00", "2026-11-15T00:00:00+99:00", "2026-13-45", "-1000000y",
                                  "0001-01-01T00:00:00+14:00"])
def test_dates_that_are_not_dates_or_out_of_range(text: str) -> None:
    with pytest.raises(DateParseError):
        relative_date_parse(text, UTC_ZONE, NOW)


@pytest.mark.parametrize(("text", "expected"), [("2020-6-01", "2020-06-01"), ("2020-06-1", "2020-06-01"),
                                                ("2020-6-1", "2020-06-01"), ("2020-06-01 10:30:00", "2020-06-01")])
def test_absolute_dates_as_people_type_them(text: str, expected: str) -> None:
    assert relative_date_parse(text, UTC_ZONE, NOW)[0].date().isoformat() == expected


def test_a_bad_date_names_its_parameter() -> None:
    with pytest.raises(DateParseError) as info:
        QueryDateRange.resolve(date_from="-7d", date_to="2026-11-15Tgarbage", interval="day", tz=UTC_ZONE, now=NOW)
    assert info.value.attr == "date_to"


@pytest.mark.parametrize(("body", "attr"), [
    ({"events": [{"id": "a"}], "shown_as": "Stickiness"}, "shown_as"),
    ({"events": [{"id": "a"}], "shown_as": "Lifecycle"}, "shown_as"),
    ({"events": [{"id": "a"}], "insight": "LIFECYCLE"}, "insight"),
    ({"events": [{"id": "a"}], "insight": "STICKINESS"}, "insight"),
])
def test_stickiness_and_lifecycle_are_refused_until_built(body: dict[str, Any], attr: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_trends_request(body)
    assert info.value.code == "unsupported" and info.value.attr == attr


@pytest.mark.parametrize(("body", "attr"), [
    ({"events": [{"id": "a", "properties": [{"value": "x"}]}]}, "events__0__properties__0__key"),
    ({"events": [{"id": "a"}], "properties": [{"key": "k", "value": "x", "type": ["x"]}]}, "properties__0__type"),
    ({"events": [{"id": "a"}], "properties": [{"key": "k", "value": "x", "operator": [1]}]},
     "properties__0__operator"),
    ({"events": [{"id": "a"}], "formula": ["A/B"]}, "formula"),
    ({"events": [{"id": "a"}], "formula": -1}, "formula"),
    ({"events": [{"id": "a"}], "date_from": ["-7d"]}, "date_from"),
    ({"events": [{"id": "a"}], "breakdown_limit": "NaN"}, "breakdown_limit"),
    ({"events": [{"id": "a"}], "breakdown_limit": 0}, "breakdown_limit"),
    ({"events": [{"id": f"e{i}"} for i in range(101)]}, "events"),
    ({"events": [{"id": "a", "math": "sum", "math_property": ["x"]}]}, "math_property"),
])
def test_trend_parameters(body: dict[str, Any], attr: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_trends_request(body)
    assert info.value.attr == attr, info.value.detail


@pytest.mark.parametrize(("extra", "attr"), [
    ({"funnel_window_interval": 10**12}, "funnel_window_interval"),
    ({"funnel_window_days": 10**12}, "funnel_window_days"),
    ({"funnel_window_interval": 10**30, "funnel_window_interval_unit": "second"}, "funnel_window_interval"),
    ({"funnel_window_interval_unit": ["day"]}, "funnel_window_interval_unit"),
    ({"exclusions": [{"id": "x", "funnel_from_step": [0], "funnel_to_step": 1}]}, "funnel_from_step"),
    ({"exclusions": [{"id": "x", "funnel_from_step": 0, "funnel_to_step": {"a": 1}}]}, "funnel_to_step"),
    ({"exclusions": [{"id": "x", "funnel_from_step": -(10**12), "funnel_to_step": 1}]}, "funnel_from_step"),
    ({"bin_count": 0}, "bin_count"),
    ({"bin_count": -3}, "bin_count"),
    ({"date_to": {"a": 1}}, "date_to"),
    ({"breakdown_attribution_type": "step", "breakdown_attribution_value": 10**12}, "breakdown_attribution_value"),
])
def test_funnel_parameters(extra: dict[str, Any], attr: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_funnel_request({"events": TWO_STEPS, **extra}, 1, "UTC", [])
    assert info.value.attr == attr, info.value.detail


@pytest.mark.parametrize(("extra", "attr"), [
    ({"exclude_events": 5}, "exclude_events"), ({"local_path_cleaning_filters": 5}, "local_path_cleaning_filters"),
    ({"path_groupings": 5}, "path_groupings"), ({"step_limit": 0}, "step_limit"), ({"step_limit": -2}, "step_limit"),
    ({"include_event_types": 0.5}, "include_event_types"), ({"date_from": [1]}, "date_from"),
    ({"edge_limit": 0}, "edge_limit"), ({"local_path_cleaning_filters": [{"regex": "("}]},
                                        "local_path_cleaning_filters"),
])
def test_path_parameters(extra: dict[str, Any], attr: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_paths_request({"include_event_types": ["$pageview"], **extra}, 1, "UTC", [], [])
    assert info.value.attr == attr, info.value.detail


@pytest.mark.parametrize(("extra", "attr"), [
    ({"total_intervals": 0}, "total_intervals"), ({"total_intervals": 501}, "total_intervals"),
    ({"breakdown_limit": "NaN"}, "breakdown_limit"), ({"breakdown_limit": "*"}, "breakdown_limit"),
    ({"period": ["Week"]}, "period"), ({"date_to": 5}, "date_to"),
])
def test_retention_parameters(extra: dict[str, Any], attr: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_retention_request(extra, [])
    assert info.value.attr == attr, info.value.detail


def test_lists_and_nesting() -> None:
    with pytest.raises(RequestError) as info:
        list_field({"x": ["a", 3, {}]}, "x", (str, int))
    assert info.value.attr == "x__2"
    deep: Any = "x"
    for _ in range(900):
        deep = [deep]
    assert nesting(deep) == 33  # counted up to the limit, never recursing


@pytest.mark.parametrize(("extra", "attr"), [
    ({"aggregation_group_type_index": 0}, "aggregation_group_type_index"),
    ({"sampling_factor": 0.1}, "sampling_factor"),
    ({"interval": "minute"}, "interval"),
])
def test_what_would_change_the_numbers_is_refused_not_ignored(extra: dict[str, Any], attr: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_trends_request({"events": [{"id": "a"}], **extra})
    assert info.value.code == "unsupported" and info.value.attr == attr
    if attr != "interval":
        for parse in (lambda: parse_funnel_request({"events": TWO_STEPS, **extra}, 1, "UTC", []),
                      lambda: parse_retention_request(extra, []),
                      lambda: parse_paths_request({"include_event_types": ["$pageview"], **extra}, 1, "UTC", [], [])):
            with pytest.raises(RequestError) as again:
                parse()
            assert again.value.code == "unsupported" and again.value.attr == attr
    parse_trends_request({"events": [{"id": "a"}], "sampling_factor": 1})  # no sampling is fine
