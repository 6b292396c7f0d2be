"""Trend results from precomputed state (spec §6): reads buckets, never raw events.

Counts come from per-hour and per-day hashes, distinct persons from per-hour and per-day sets, first
times from per-hour and per-day counters. Wider buckets and sliding windows (weekly/monthly active)
are unions of the day and hour sets they cover, so every number is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis

from schemas import keys
from schemas.dates import (
    QueryDateRange,
    bucket_day,
    bucket_label,
    day_string,
    iso_instant,
    next_bucket,
    relative_date_parse,
    start_of_interval,
    zone,
)
from schemas.formula import Formula
from schemas.registry import Project
from schemas.trends import ACTOR_MATHS, Entity, RequestError, TrendsRequest

_WINDOW_DAYS = {"weekly_active": 7, "monthly_active": 30}
_RELATIVE_WEEKS = ("d", "w")


@dataclass(frozen=True)
class Period:
    range: QueryDateRange
    buckets: list[datetime]
    compare_label: str | None
    lower: datetime  # first instant that counts (week ranges do not floor date_from, §19.9)


def _dates(first: datetime, last: datetime) -> list[str]:
    """Project-zone dates YYYYMMDD from `first` to `last`, inclusive."""
    out, day = [], first.date()
    while day <= last.date():
        out.append(day.strftime("%Y%m%d"))
        day += timedelta(days=1)
    return out


class TrendQuery:
    def __init__(self, client: redis.Redis, project: Project, request: TrendsRequest, now: datetime) -> None:
        self.redis, self.project, self.request, self.now = client, project, request, now
        self.tz = zone(project.timezone)
        self.interval = request.interval
        if request.filter_test_accounts and project.test_account_filters:
            raise RequestError("Test-account filters are not supported yet.", "filter_test_accounts", "unsupported")
        for entity in request.entities:
            if entity.math == "first_time_for_user" and entity.id is None:
                raise RequestError("first_time_for_user needs a named event.", f"events__{entity.index}__math",
                                   "unsupported")
        earliest = None
        if request.date_from == "all":
            raw = client.hget(keys.project_prefix(project.id) + "meta", "earliest_ms")
            if raw is not None:
                earliest = datetime.fromtimestamp(int(raw) / 1000, self.tz)
        try:
            current = QueryDateRange.resolve(
                date_from=request.date_from, date_to=request.date_to, interval=request.interval, tz=self.tz,
                now=now, week_start=project.week_start_day, explicit=request.explicit_date, earliest=earliest)
        except ValueError as exc:
            attr = "date_to" if request.date_to and str(request.date_to) in str(exc) else "date_from"
            raise RequestError(str(exc), attr) from exc
        first = self._period(current, "current" if request.compare else None)
        self.periods = [first] + ([self._previous(first)] if request.compare else [])
        self.formula = Formula(request.formula, len(request.entities)) if request.formula else None
        self._names: list[str] | None = None

    # --- periods ---------------------------------------------------------------------------------
    def _period(self, date_range: QueryDateRange, label: str | None, count: int | None = None) -> Period:
        if count is None:
            buckets = date_range.buckets()
        else:
            buckets = [start_of_interval(date_range.date_from, self.interval, self.project.week_start_day)]
            while len(buckets) < count:
                buckets.append(next_bucket(buckets[-1], self.interval))
        if self.interval == "week":
            lower = date_range.date_from.replace(hour=0, minute=0, second=0, microsecond=0)
        else:
            lower = start_of_interval(date_range.date_from, self.interval, self.project.week_start_day)
        return Period(date_range, buckets, label, lower)

    def _previous(self, current: Period) -> Period:
        """The previous period (§6.7, §19.3): shifted back by the range length, as many buckets."""
        r = current.range
        length = r.date_to - r.date_from
        start = (r.date_from - length).replace(hour=0, minute=0, second=0, microsecond=0)
        if self.interval == "hour":
            start = start.replace(hour=r.date_from.hour)
        if self.interval == "day" and self._weekly_relative():
            start += timedelta(days=1)
        start = start.replace(tzinfo=None).replace(tzinfo=self.tz)
        previous = QueryDateRange(start, start + length, self.interval, r.week_start)
        return self._period(previous, "previous", count=len(current.buckets))

    def _weekly_relative(self) -> bool:
        text = (self.request.date_from or "-7d").strip()
        if self.request.date_to and not _is_absolute(self.request.date_to):
            return False
        number, unit = text.lstrip("-")[:-1], text[-1:]
        return unit in _RELATIVE_WEEKS and number.isdigit() and (unit == "w" or int(number) % 7 == 0)

    def _day_groups(self, period: Period) -> list[list[str]]:
        groups = []
        for start in period.buckets:
            end = next_bucket(start, self.interval) - timedelta(microseconds=1)
            groups.append(_dates(max(start, period.lower), min(end, period.range.date_to)))
        return groups

    def _event_names(self, entity: Entity) -> list[str]:
        if entity.id is not None:
            return [entity.id]
        if self._names is None:
            self._names = sorted(m.decode() for m in self.redis.smembers(keys.event_names(self.project.id)))
        return self._names

    # --- counting maths --------------------------------------------------------------------------
    def _counts(self, period: Period, events: list[str], hour_key: Any, day_key: Any) -> list[int]:
        pid = self.project.id
        out = [0] * len(period.buckets)
        if not events:
            return out
        pipe = self.redis.pipeline(transaction=False)
        if self.interval == "hour":
            fields = [int(b.timestamp()) for b in period.buckets]
            for event in events:
                pipe.hmget(hour_key(pid, event), fields)
            for values in pipe.execute():
                for i, v in enumerate(values):
                    out[i] += int(v or 0)
            return out
        groups = self._day_groups(period)
        flat = [d for g in groups for d in g]
        if not flat:
            return out
        for event in events:
            pipe.hmget(day_key(pid, event), flat)
        for values in pipe.execute():
            by_day = dict(zip(flat, values, strict=True))
            for i, group in enumerate(groups):
                out[i] += sum(int(by_day[d] or 0) for d in group)
        return out

    # --- actor maths: which person sets make up each bucket --------------------------------------
    def _actor_keys(self, entity: Entity, period: Period, events: list[str]) -> list[list[str]]:
        pid = self.project.id
        window = _WINDOW_DAYS.get(entity.math)
        degrade = window is None or self.interval == "month" or (window == 7 and self.interval == "week")
        if degrade:
            if self.interval == "hour":
                return [[keys.hour_persons(pid, e, int(b.timestamp())) for e in events] for b in period.buckets]
            return [[keys.day_persons(pid, e, d) for e in events for d in group] for group in self._day_groups(period)]
        if self.interval == "hour":
            return [self._hour_window(events, int(b.timestamp()), window) for b in period.buckets]
        out = []
        for start in period.buckets:
            last = start.date()
            days = [(last - timedelta(days=i)).strftime("%Y%m%d") for i in range(window)]
            out.append([keys.day_persons(pid, e, d) for e in events for d in days])
        return out

    def _hour_window(self, events: list[str], hour: int, days: int) -> list[str]:
        """Trailing window of `days` ending with this hour (§19.11): whole days as day sets."""
        pid = self.project.id
        hours = [hour - 3600 * i for i in range(days * 24)]
        by_day: dict[str, list[int]] = {}
        for h in hours:
            by_day.setdefault(bucket_day(h * 1000, self.tz), []).append(h)
        out = []
        for day, members in by_day.items():
            first_of_day = datetime.strptime(day, "%Y%m%d").replace(tzinfo=self.tz)
            whole = len(members) == round((next_bucket(first_of_day, "day") - first_of_day).total_seconds() / 3600)
            if whole:
                out += [keys.day_persons(pid, e, day) for e in events]
            else:
                out += [keys.hour_persons(pid, e, h) for e in events for h in members]
        return out

    def _distinct_per_bucket(self, key_lists: list[list[str]]) -> list[int]:
        pipe = self.redis.pipeline(transaction=False)
        for members in key_lists:
            if len(members) == 1:
                pipe.scard(members[0])
            elif members:
                pipe.sunion(members)
            else:
                pipe.echo("0")
        return [int(v) if isinstance(v, int | bytes) else len(v) for v in pipe.execute()]

    def _cumulative_distinct(self, key_lists: list[list[str]]) -> list[int]:
        """Each actor counts once, in the first bucket it appears (E3 cumulative for actor maths)."""
        pipe = self.redis.pipeline(transaction=False)
        for members in key_lists:
            if members:
                pipe.sunion(members)
            else:
                pipe.echo("")
        seen: set[bytes] = set()
        out = []
        for value in pipe.execute():
            if isinstance(value, set):
                seen |= value
            out.append(len(seen))
        return out

    # --- one series in one period ----------------------------------------------------------------
    def _values(self, entity: Entity, period: Period) -> tuple[list[int], list[int] | None, int | None]:
        """(per-bucket values, cumulative values if asked, aggregated value if a total display)."""
        events = self._event_names(entity)
        cumulative = self.request.display == "ActionsLineGraphCumulative"
        if entity.math in ACTOR_MATHS:
            key_lists = self._actor_keys(entity, period, events)
            if self.request.total_value:
                return [], None, self._distinct_total(entity, period, events)
            data = self._distinct_per_bucket(key_lists)
            return data, self._cumulative_distinct(key_lists) if cumulative else None, None
        if entity.math == "first_time_for_user":
            data = self._counts(period, events, keys.first_time_hour_counts, keys.first_time_day_counts)
        else:
            data = self._counts(period, events, keys.hour_counts, keys.day_counts)
        if self.request.total_value:
            return [], None, sum(data)
        return data, _running(data) if cumulative else None, None

    def _distinct_total(self, entity: Entity, period: Period, events: list[str]) -> int:
        """Distinct actors over the whole range; weekly/monthly: the window ending at date_to (§6.6)."""
        pid = self.project.id
        window = _WINDOW_DAYS.get(entity.math)
        if window is None:
            if self.interval == "hour":
                members = [keys.hour_persons(pid, e, int(b.timestamp())) for e in events for b in period.buckets]
            else:
                members = [keys.day_persons(pid, e, d) for e in events for g in self._day_groups(period) for d in g]
        else:
            last = period.range.date_to.date()
            members = [keys.day_persons(pid, e, (last - timedelta(days=i)).strftime("%Y%m%d"))
                       for e in events for i in range(window)]
        return len(self.redis.sunion(members)) if members else 0

    def _object(self, period: Period, label: str, action: dict[str, Any] | None, order: int | None,
                data: list, cumulative: list | None, aggregated: float | None) -> dict[str, Any]:
        total_value = self.request.total_value
        result: dict[str, Any] = {
            "data": [] if total_value else (cumulative if cumulative is not None else data),
            "labels": [] if total_value else [bucket_label(b, self.interval, period.range) for b in period.buckets],
            "days": [] if total_value else [day_string(b, self.interval) for b in period.buckets],
            "count": 0 if total_value else float(sum(data)),
            "label": label, "filter": self.filter, "action": action,
        }
        if order is not None:
            result["order"] = order
        if total_value:
            result["aggregated_value"] = aggregated
        if period.compare_label:
            result["compare"] = True
            result["compare_label"] = period.compare_label
        return result

    @property
    def filter(self) -> dict[str, Any]:
        return self.request.filter_dict()

    def run(self) -> list[dict[str, Any]]:
        computed = {(e.index, i): self._values(e, p) for e in self.request.entities
                    for i, p in enumerate(self.periods)}
        if self.formula is not None:
            return [self._formula_object(i, p, computed) for i, p in enumerate(self.periods)]
        out = []
        for entity in self.request.entities:
            for i, period in enumerate(self.periods):
                data, cumulative, aggregated = computed[(entity.index, i)]
                action = entity.action_dict([iso_instant(b) for b in period.buckets])
                out.append(self._object(period, entity.label, action, entity.index, data, cumulative, aggregated))
        return out

    def _formula_object(self, i: int, period: Period, computed: dict) -> dict[str, Any]:
        assert self.formula is not None
        series = [computed[(e.index, i)] for e in self.request.entities]
        label = f"Formula ({self.formula.text})"
        if self.request.total_value:
            value = self.formula.evaluate([s[2] or 0 for s in series])
            return self._object(period, label, None, None, [], None, value)
        data = self.formula.pointwise([s[0] for s in series])
        cumulative = _running(data) if self.request.display == "ActionsLineGraphCumulative" else None
        return self._object(period, label, None, None, data, cumulative, None)


def _running(values: list) -> list:
    out, total = [], 0
    for value in values:
        total += value
        out.append(total)
    return out


def _is_absolute(text: str) -> bool:
    return len(text) >= 10 and text[:4].isdigit() and text[4] == "-"


def resolve_now(header: str | None, test_clock: bool, default: datetime) -> datetime:
    """The request's "now": the test clock header when enabled (CONTRACT.md), else wall clock."""
    if test_clock and header:
        moment, _ = relative_date_parse(header, zone("UTC"), default)
        return moment
    return default
