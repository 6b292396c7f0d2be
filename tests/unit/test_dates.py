"""Relative dates, ranges, buckets and labels (spec §5, appendix A.1 and A.6)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.dates import (
    DateParseError,
    QueryDateRange,
    bucket_day,
    bucket_hour,
    bucket_label,
    relative_date_parse,
    zone,
)

UTC_TZ = zone("UTC")
NOW = datetime(2024, 3, 7, 15, 30, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "truncate", "expected"),
    [
        ("-7d", True, "2024-02-29T00:00:00+00:00"),
        ("-7d", False, "2024-02-29T15:30:12+00:00"),
        ("7d", True, "2024-02-29T00:00:00+00:00"),
        ("-24h", True, "2024-03-06T15:00:00+00:00"),
        ("dStart", False, "2024-03-07T00:00:00+00:00"),
        ("-1dStart", False, "2024-03-06T00:00:00+00:00"),
        ("-1dEnd", False, "2024-03-06T23:59:59.999999+00:00"),
        ("mStart", False, "2024-03-01T00:00:00+00:00"),
        ("-1mStart", False, "2024-02-01T00:00:00+00:00"),
        ("-1mEnd", False, "2024-02-29T23:59:59.999999+00:00"),
        ("yStart", False, "2024-01-01T00:00:00+00:00"),
        ("-1w", True, "2024-02-29T00:00:00+00:00"),
        ("-1q", True, "2023-12-07T00:00:00+00:00"),
        ("2024-01-05", False, "2024-01-05T00:00:00+00:00"),
        ("2024-01-05T06:00:00Z", False, "2024-01-05T06:00:00+00:00"),
        ("2024-01-05 06:00:00", False, "2024-01-05T06:00:00+00:00"),
    ],
)
def test_relative_date_parse(text: str, truncate: bool, expected: str) -> None:
    parsed, _ = relative_date_parse(text, UTC_TZ, NOW, always_truncate=truncate)
    assert parsed.isoformat() == expected


def test_relative_in_project_zone() -> None:
    pacific = zone("US/Pacific")
    parsed, relative = relative_date_parse("dStart", pacific, NOW)
    assert relative and parsed.isoformat() == "2024-03-07T00:00:00-08:00"
    naive, relative = relative_date_parse("2024-03-10T12:00:00", pacific, NOW)
    assert not relative and naive.isoformat() == "2024-03-10T12:00:00-07:00"  # after the DST change


def test_bad_dates() -> None:
    for text in ("not-a-date-zz", "tomorrow", "-7x", "2024-13-45"):
        with pytest.raises(DateParseError):
            relative_date_parse(text, UTC_TZ, NOW)
    with pytest.raises(DateParseError):
        zone("Mars/Olympus")


def test_range_and_day_buckets() -> None:
    r = QueryDateRange.resolve(date_from="-3d", date_to=None, interval="day", tz=UTC_TZ, now=NOW)
    assert [b.date().isoformat() for b in r.buckets()] == ["2024-03-04", "2024-03-05", "2024-03-06", "2024-03-07"]
    assert r.date_to.isoformat() == "2024-03-07T23:59:59.999999+00:00"
    assert bucket_label(r.buckets()[0], "day") == "4-Mar-2024"


def test_hour_range_relative_end_is_end_of_hour() -> None:
    r = QueryDateRange.resolve(date_from="dStart", date_to=None, interval="hour", tz=UTC_TZ, now=NOW)
    assert len(r.buckets()) == 16 and bucket_label(r.buckets()[-1], "hour") == "7-Mar 15:00"
    exact = QueryDateRange.resolve(date_from="2024-03-07T06:00:00Z", date_to="2024-03-07T08:00:00Z",
                                   interval="hour", tz=UTC_TZ, now=NOW)
    assert len(exact.buckets()) == 3


def test_week_labels_appendix_a6() -> None:
    """Week starts Sunday; range 2024-02-26 … 2024-03-14."""
    r = QueryDateRange.resolve(date_from="2024-02-26", date_to="2024-03-14", interval="week", tz=UTC_TZ, now=NOW)
    labels = [bucket_label(b, "week", r) for b in r.buckets()]
    assert labels == ["26-Feb – 2-Mar", "3–9 Mar", "10–14 Mar"]
    monday = QueryDateRange.resolve(date_from="2024-02-26", date_to="2024-03-14", interval="week", tz=UTC_TZ,
                                    now=NOW, week_start=1)
    assert [b.date().isoformat() for b in monday.buckets()] == ["2024-02-26", "2024-03-04", "2024-03-11"]


def test_month_labels_and_year_crossing_week() -> None:
    r = QueryDateRange.resolve(date_from="2024-01-15", date_to="2024-03-01", interval="month", tz=UTC_TZ, now=NOW)
    assert [bucket_label(b, "month") for b in r.buckets()] == ["Jan 2024", "Feb 2024", "Mar 2024"]
    w = QueryDateRange.resolve(date_from="2024-12-29", date_to="2025-01-04", interval="week", tz=UTC_TZ, now=NOW)
    assert [bucket_label(b, "week", w) for b in w.buckets()] == ["29-Dec-2024 – 4-Jan-2025"]


def test_event_buckets_in_project_zone() -> None:
    ts = int(datetime(2024, 3, 7, 3, 30, tzinfo=UTC).timestamp() * 1000)
    assert bucket_day(ts, UTC_TZ) == "20240307"
    assert bucket_day(ts, zone("US/Pacific")) == "20240306"
    kolkata = bucket_hour(ts, zone("Asia/Kolkata"))  # +05:30: local hours start at :30 UTC
    assert datetime.fromtimestamp(kolkata, UTC).isoformat() == "2024-03-07T03:30:00+00:00"
