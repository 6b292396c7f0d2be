"""Relative dates, query date ranges, buckets and labels: the one definition (spec §5).

The dataflow uses `bucket_hour`/`bucket_day` to decide where an event's partial aggregates live; the
API uses `QueryDateRange` to decide which buckets a request reads and how they are labelled. Both
go through the same project time zone, so a bucket written is exactly a bucket read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.relativedelta import relativedelta

from schemas.errors import RequestError
from schemas.fields import MAX_BUCKETS

INTERVALS = ("hour", "day", "week", "month")
_RELATIVE = re.compile(r"-?(?P<number>[0-9]+)?(?P<type>[a-zA-Z])(?P<position>Start|End)?")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
DEFAULT_DATE_FROM_DAYS = 7


class DateParseError(ValueError):
    """A date string that is neither absolute nor a relative form PostHog accepts; `attr` names the
    parameter when the caller knows it."""

    def __init__(self, detail: str, attr: str | None = None) -> None:
        super().__init__(detail)
        self.attr = attr


# Query dates live where event times do (schemas/events.py): nothing outside can match an event,
# and every calendar computation inside stays an ordinary date.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise DateParseError(f"Unknown time zone '{name}'.") from exc


_ABSOLUTE = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}")
_DATE = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$")
_FORMS = ("use YYYY-MM-DD, an ISO-8601 datetime, or a relative date such as -7d, -24h, -1m, dStart, mStart or "
          "yStart")


def is_absolute(value: str) -> bool:
    """A date or datetime string (anything else is a relative form)."""
    return bool(_ABSOLUTE.match(value.strip()))


def _absolute(value: str, tz: ZoneInfo) -> datetime | None:
    """An absolute date (months and days may be unpadded, as people type them) or an ISO-8601
    datetime; None for anything that does not start like a date."""
    text = value.strip()
    if not is_absolute(text):
        return None
    day = _DATE.match(text)
    try:
        if day:
            parsed = datetime(int(day[1]), int(day[2]), int(day[3]))  # noqa: DTZ001 - localised below
        else:
            parsed = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError as exc:
        raise DateParseError(f"Could not parse date '{value[:64]}': {_FORMS}.") from exc
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=tz)
    try:
        return parsed.astimezone(tz)
    except OverflowError as exc:
        raise DateParseError(f"The date '{value[:64]}' is outside 1900-01-01 .. 2199-12-31, the range events can "
                             "have.") from exc


def _within(moment: datetime, value: str) -> datetime:
    if not EARLIEST <= moment < LATEST:
        raise DateParseError(f"The date '{value[:64]}' is outside 1900-01-01 .. 2199-12-31, the range events can have.")
    return moment


def _delta_for(kind: str, number: str | None, position: str | None) -> tuple[dict[str, int], dict[str, int]]:
    """(relative amounts, absolute replacements) for one relative token, as PostHog's mapping does."""
    n = int(number) if number else None
    rel: dict[str, int] = {}
    snap: dict[str, int] = {}
    start_of_day = {"hour": 0, "minute": 0, "second": 0, "microsecond": 0}
    end_of_day = {"hour": 23, "minute": 59, "second": 59, "microsecond": 999999}
    if kind == "h":
        if n:
            rel["hours"] = n
        if position == "Start":
            snap = {"minute": 0, "second": 0, "microsecond": 0}
        elif position == "End":
            snap = {"minute": 59, "second": 59, "microsecond": 999999}
    elif kind in ("d", "w"):
        if n:
            rel["days" if kind == "d" else "weeks"] = n
        snap = start_of_day if position == "Start" else end_of_day if position == "End" else {}
    elif kind == "m":
        if n:
            rel["months"] = n
        if position == "Start":
            snap = {"day": 1, **start_of_day}
        elif position == "End":
            snap = {"day": 31, **end_of_day}
    elif kind == "q":
        if n:
            rel["weeks"] = 13 * n
    elif kind == "y":
        if n:
            rel["years"] = n
        if position == "Start":
            snap = {"month": 1, "day": 1, **start_of_day}
        elif position == "End":
            snap = {"month": 12, "day": 31, **end_of_day}
    elif kind == "M":
        if n:
            rel["minutes"] = n
    elif kind == "s":
        if n:
            rel["seconds"] = n
    else:
        raise DateParseError(f"Unknown relative date unit '{kind}'.")
    return rel, snap


def relative_date_parse(value: str, tz: ZoneInfo, now: datetime, *, always_truncate: bool = False
                        ) -> tuple[datetime, bool]:
    """Resolve an absolute or relative date string in `tz`; also say whether it was relative (§5.2)."""
    if not isinstance(value, str):
        raise DateParseError(f"A date must be a string: {_FORMS}.")
    absolute = _absolute(value, tz)
    if absolute is not None:
        return _within(absolute, value), False
    local_now = now.astimezone(tz)
    match = _RELATIVE.fullmatch(value.strip())
    if not match or match["type"] not in "hdwmqyMs":
        raise DateParseError(f"Could not parse date '{value[:64]}': {_FORMS}.")
    rel, snap = _delta_for(match["type"], match["number"], match["position"])
    try:
        parsed = local_now + relativedelta(**snap) - relativedelta(**rel)
        parsed = datetime.fromtimestamp(parsed.replace(tzinfo=None).replace(tzinfo=tz).timestamp(), tz)
        _within(parsed, value)
    except (OverflowError, ValueError) as exc:
        raise DateParseError(f"The date '{value[:64]}' is outside 1900-01-01 .. 2199-12-31, the range events can "
                             "have.") from exc
    if always_truncate and not match["position"]:
        if match["type"] in ("h", "M", "s"):
            parsed = parsed.replace(minute=0, second=0, microsecond=0)
        else:
            parsed = parsed.replace(hour=0, minute=0, second=0, microsecond=0)
    return parsed, True


def _parsed(value: str, attr: str, tz: ZoneInfo, now: datetime, always_truncate: bool = False
            ) -> tuple[datetime, bool]:
    try:
        return relative_date_parse(value, tz, now, always_truncate=always_truncate)
    except DateParseError as exc:
        raise DateParseError(str(exc), attr) from exc


def start_of_interval(moment: datetime, interval: str, week_start: int = 0) -> datetime:
    """Floor a zoned datetime to the start of its bucket (week_start 0 = Sunday, 1 = Monday)."""
    tz = moment.tzinfo
    if interval == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "day":
        return _relocalise(day, tz)
    if interval == "week":
        # Python weekday(): Monday = 0. Days back to the week's first day:
        back = (day.weekday() + 1) % 7 if week_start == 0 else day.weekday()
        return _relocalise(day - timedelta(days=back), tz)
    if interval == "month":
        return _relocalise(day.replace(day=1), tz)
    raise ValueError(f"Unknown interval '{interval}'.")


def next_bucket(start: datetime, interval: str) -> datetime:
    tz = start.tzinfo
    if interval == "hour":
        return datetime.fromtimestamp(start.timestamp() + 3600, tz)
    if interval == "day":
        return _relocalise(start + timedelta(days=1), tz)
    if interval == "week":
        return _relocalise(start + timedelta(days=7), tz)
    return _relocalise(start + relativedelta(months=1), tz)


def _relocalise(wall: datetime, tz: object) -> datetime:
    """Same wall-clock time, with the UTC offset valid on that date (DST)."""
    return wall.replace(tzinfo=None).replace(tzinfo=tz)  # type: ignore[arg-type]


@dataclass(frozen=True)
class QueryDateRange:
    """E3 `QueryDateRange` (§5.4): the resolved [date_from, date_to] and its buckets."""

    date_from: datetime
    date_to: datetime
    interval: str
    week_start: int

    @classmethod
    def resolve(cls, *, date_from: str | None, date_to: str | None, interval: str, tz: ZoneInfo,
                now: datetime, week_start: int = 0, explicit: bool = False,
                earliest: datetime | None = None) -> QueryDateRange:
        local_now = now.astimezone(tz)
        if date_to:
            end, relative = _parsed(date_to, "date_to", tz, local_now)
        else:
            end, relative = local_now, True
        if not explicit:
            if interval != "hour":
                end = end.replace(hour=23, minute=59, second=59, microsecond=999999)
            elif relative:
                end = end.replace(minute=59, second=59, microsecond=999999)
        if date_from == "all":
            start = (earliest or datetime(2015, 1, 1, tzinfo=UTC)).astimezone(tz)
        elif date_from:
            start, _ = _parsed(date_from, "date_from", tz, local_now, always_truncate=not explicit)
        else:
            start = _relocalise(local_now.replace(hour=0, minute=0, second=0, microsecond=0)
                                - timedelta(days=DEFAULT_DATE_FROM_DAYS), tz)
        return cls(start, end, interval, week_start)

    def buckets(self) -> list[datetime]:
        """Bucket start instants from start_of_interval(date_from) while <= date_to."""
        seconds = (self.date_to - self.date_from).total_seconds()
        rough = seconds / {"hour": 3600, "day": 86400, "week": 7 * 86400, "month": 28 * 86400}[self.interval]
        if rough > MAX_BUCKETS + 2:
            raise RequestError(f"This date range has about {int(rough):,} {self.interval}s; at most {MAX_BUCKETS:,} "
                               "intervals can be asked at once. Use a coarser interval or a shorter range.",
                               "interval")
        out = []
        current = start_of_interval(self.date_from, self.interval, self.week_start)
        while current <= self.date_to:
            out.append(current)
            current = next_bucket(current, self.interval)
        if len(out) > MAX_BUCKETS:
            raise RequestError(f"This date range has {len(out):,} {self.interval}s; at most {MAX_BUCKETS:,} "
                               "intervals can be asked at once. Use a coarser interval or a shorter range.",
                               "interval")
        return out


def day_string(moment: datetime, interval: str) -> str:
    """The `days[i]` string (§5.5)."""
    if interval == "hour":
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    return moment.strftime("%Y-%m-%d")


def bucket_label(moment: datetime, interval: str, date_range: QueryDateRange | None = None) -> str:
    """The E3 `labels[i]` string (§5.5)."""
    month = _MONTHS[moment.month - 1]
    if interval == "day":
        return f"{moment.day}-{month}-{moment.year}"
    if interval == "hour":
        return f"{moment.day}-{month} {moment:%H:%M}"
    if interval == "month":
        return f"{month} {moment.year}"
    first = moment.date()
    last = first + timedelta(days=6)
    if date_range is not None:
        first = max(first, date_range.date_from.date())
        last = min(last, date_range.date_to.date())
    return _week_label(first, last)


def _week_label(first: date, last: date) -> str:
    m1, m2 = _MONTHS[first.month - 1], _MONTHS[last.month - 1]
    if first == last:
        return f"{first.day}-{m1}-{first.year}"
    if first.year != last.year:
        return f"{first.day}-{m1}-{first.year} – {last.day}-{m2}-{last.year}"
    if first.month != last.month:
        return f"{first.day}-{m1} – {last.day}-{m2}"
    return f"{first.day}–{last.day} {m1}"


def iso_instant(moment: datetime) -> str:
    """ISO-8601 with `Z` for UTC and the zone's offset otherwise (§1.3)."""
    text = moment.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


# --- where an event's partial aggregates live -------------------------------------------------

def bucket_hour(ts_ms: int, tz: ZoneInfo) -> int:
    """Epoch seconds of the start of the event's hour in the project zone."""
    moment = datetime.fromtimestamp(ts_ms / 1000, tz)
    return int(moment.replace(minute=0, second=0, microsecond=0).timestamp())


def day_keys(first: datetime, last: datetime) -> list[str]:
    """Project-zone dates YYYYMMDD from `first` to `last`, inclusive (the keys of per-day state)."""
    out, day = [], first.date()
    while day <= last.date():
        out.append(day.strftime("%Y%m%d"))
        day += timedelta(days=1)
    return out


def bucket_day(ts_ms: int, tz: ZoneInfo) -> str:
    """The event's date in the project zone, as YYYYMMDD."""
    return datetime.fromtimestamp(ts_ms / 1000, tz).strftime("%Y%m%d")
