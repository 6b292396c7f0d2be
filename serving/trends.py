"""Trend results from precomputed state (spec §6): reads buckets, never raw events.

Counts come from per-hour and per-day hashes, distinct persons from per-hour and per-day sets;
week and month buckets combine the days they cover, so every number is exact.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import redis

from schemas import keys
from schemas.dates import (
    QueryDateRange,
    bucket_label,
    day_string,
    iso_instant,
    next_bucket,
    relative_date_parse,
    start_of_interval,
    zone,
)
from schemas.registry import Project
from schemas.trends import Entity, RequestError, TrendsRequest


def _days_between(first: datetime, last: datetime) -> list[str]:
    """Project-zone dates YYYYMMDD from `first` to `last`, inclusive."""
    out = []
    day = first.date()
    while day <= last.date():
        out.append(day.strftime("%Y%m%d"))
        day += timedelta(days=1)
    return out


class TrendQuery:
    def __init__(self, client: redis.Redis, project: Project, request: TrendsRequest, now: datetime) -> None:
        self.redis = client
        self.project = project
        self.request = request
        self.tz = zone(project.timezone)
        self.now = now
        if request.filter_test_accounts and project.test_account_filters:
            raise RequestError("Test-account filters are not supported yet.", "filter_test_accounts",
                               "unsupported")
        earliest = None
        if request.date_from == "all":
            raw = client.hget(keys.project_prefix(project.id) + "meta", "earliest_ms")
            if raw is not None:
                earliest = datetime.fromtimestamp(int(raw) / 1000, self.tz)
        try:
            self.range = QueryDateRange.resolve(
                date_from=request.date_from, date_to=request.date_to, interval=request.interval, tz=self.tz,
                now=now, week_start=project.week_start_day, explicit=request.explicit_date, earliest=earliest)
        except ValueError as exc:
            attr = "date_to" if request.date_to and str(request.date_to) in str(exc) else "date_from"
            raise RequestError(str(exc), attr) from exc
        self.buckets = self.range.buckets()

    # --- which stored buckets make up each result bucket ---------------------------------------
    def _lower_bound(self) -> datetime:
        """Weeks start counting at date_from's day; other intervals at the bucket start (§5.4)."""
        if self.request.interval == "week":
            return self.range.date_from.replace(hour=0, minute=0, second=0, microsecond=0)
        return start_of_interval(self.range.date_from, self.request.interval, self.project.week_start_day)

    def _day_groups(self) -> list[list[str]]:
        lower = self._lower_bound()
        groups = []
        for start in self.buckets:
            end = next_bucket(start, self.request.interval) - timedelta(microseconds=1)
            groups.append(_days_between(max(start, lower), min(end, self.range.date_to)))
        return groups

    def _event_names(self, entity: Entity) -> list[str]:
        if entity.id is not None:
            return [entity.id]
        return sorted(m.decode() for m in self.redis.smembers(keys.event_names(self.project.id)))

    # --- values ----------------------------------------------------------------------------------
    def _totals(self, events: list[str]) -> list[int]:
        pid = self.project.id
        out = [0] * len(self.buckets)
        if not events:
            return out
        pipe = self.redis.pipeline(transaction=False)
        if self.request.interval == "hour":
            fields = [int(b.timestamp()) for b in self.buckets]
            for event in events:
                pipe.hmget(keys.hour_counts(pid, event), fields)
            for values in pipe.execute():
                for i, v in enumerate(values):
                    out[i] += int(v or 0)
            return out
        groups = self._day_groups()
        flat = [d for g in groups for d in g]
        for event in events:
            pipe.hmget(keys.day_counts(pid, event), flat)
        for values in pipe.execute():
            by_day = dict(zip(flat, values, strict=True))
            for i, group in enumerate(groups):
                out[i] += sum(int(by_day[d] or 0) for d in group)
        return out

    def _person_sets(self, events: list[str]) -> list[list[str]]:
        pid = self.project.id
        if self.request.interval == "hour":
            return [[keys.hour_persons(pid, e, int(b.timestamp())) for e in events] for b in self.buckets]
        return [[keys.day_persons(pid, e, d) for e in events for d in group] for group in self._day_groups()]

    def _distinct(self, events: list[str]) -> list[int]:
        sets = self._person_sets(events)
        pipe = self.redis.pipeline(transaction=False)
        for members in sets:
            if len(members) == 1:
                pipe.scard(members[0])
            elif members:
                pipe.sunion(members)
            else:
                pipe.echo("0")
        out = []
        for value in pipe.execute():
            out.append(int(value) if isinstance(value, int | bytes) else len(value))
        return out

    def _distinct_over_range(self, events: list[str]) -> int:
        members = [k for group in self._person_sets(events) for k in group]
        if not members:
            return 0
        return len(self.redis.sunion(members))

    # --- result objects --------------------------------------------------------------------------
    def series(self, entity: Entity) -> dict[str, Any]:
        events = self._event_names(entity)
        interval = self.request.interval
        data = self._distinct(events) if entity.math == "dau" else self._totals(events)
        days = [day_string(b, interval) for b in self.buckets]
        labels = [bucket_label(b, interval, self.range) for b in self.buckets]
        action = entity.action_dict([iso_instant(b) for b in self.buckets])
        result: dict[str, Any] = {
            "data": data, "labels": labels, "days": days, "count": float(sum(data)), "label": entity.label,
            "filter": self.request.filter_dict(), "action": action, "order": entity.index,
        }
        if self.request.display == "ActionsLineGraphCumulative":
            result["data"] = self._cumulative(entity, events, data)
        if self.request.total_value:
            value = self._distinct_over_range(events) if entity.math == "dau" else sum(data)
            result.update({"data": [], "days": [], "labels": [], "count": 0, "aggregated_value": value})
        return result

    def _cumulative(self, entity: Entity, events: list[str], data: list[int]) -> list[int]:
        """Running totals; actor maths count each actor once, in the first bucket it appears (E3)."""
        if entity.math != "dau":
            running, out = 0, []
            for value in data:
                running += value
                out.append(running)
            return out
        seen: set[bytes] = set()
        out = []
        pipe = self.redis.pipeline(transaction=False)
        for members in self._person_sets(events):
            if members:
                pipe.sunion(members)
            else:
                pipe.echo("")
        for value in pipe.execute():
            if isinstance(value, set):
                seen |= value
            out.append(len(seen))
        return out

    def run(self) -> list[dict[str, Any]]:
        return [self.series(entity) for entity in self.request.entities]


def resolve_now(header: str | None, test_clock: bool, default: datetime) -> datetime:
    """The request's "now": the test clock header when enabled (CONTRACT.md), else wall clock."""
    if test_clock and header:
        moment, _ = relative_date_parse(header, zone("UTC"), default)
        return moment
    return default
