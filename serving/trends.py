"""Trend results from precomputed state (spec §6): reads buckets, never raw events.

Counts come from per-hour and per-day hashes, distinct persons from per-hour and per-day sets, first
times from per-hour and per-day counters. Wider buckets and sliding windows (weekly/monthly active)
are unions of the day and hour sets they cover, so every number is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import orjson
import redis

from schemas.dates import (
    QueryDateRange,
    bucket_day,
    bucket_label,
    day_keys,
    day_string,
    is_absolute,
    iso_instant,
    next_bucket,
    relative_date_parse,
    start_of_interval,
    zone,
)
from schemas.definitions import BREAKDOWN_NULL, BREAKDOWN_OTHER, NO_BREAKDOWN, Definition
from schemas.formula import Formula
from schemas.projects import Project
from schemas.trends import (
    ACTOR_MATHS,
    PER_ACTOR_MATHS,
    PROPERTY_MATHS,
    QUANTILES,
    Entity,
    RequestError,
    TrendsRequest,
    definition_for,
)
from serving.compute import Computation
from state import keys
from state.reads import Bucket, Source

_WINDOW_DAYS = {"weekly_active": 7, "monthly_active": 30}
_RELATIVE_WEEKS = ("d", "w")


@dataclass(frozen=True)
class Period:
    range: QueryDateRange
    buckets: list[datetime]
    compare_label: str | None
    lower: datetime  # first instant that counts (week ranges do not floor date_from, §19.9)


class TrendQuery(Computation):
    def __init__(self, client: redis.Redis, project: Project, request: TrendsRequest, now: datetime) -> None:
        self.redis, self.project, self.request, self.now = client, project, request, now
        self.tz = zone(project.timezone)
        self.interval = request.interval
        for entity in request.entities:
            if entity.math == "first_time_for_user" and entity.id is None:
                raise RequestError("first_time_for_user needs a named event.", f"events__{entity.index}__math",
                                   "unsupported")
        earliest = None
        if request.date_from == "all":
            earliest_ms = self.state.earliest_ms(project.id)
            if earliest_ms is not None:
                earliest = datetime.fromtimestamp(earliest_ms / 1000, self.tz)
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
        self._definitions = {e.index: definition_for(e, request, project.id, project.timezone,
                                                     project.test_account_filters) for e in request.entities}

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
        elif self.interval == "day":  # from the hour the range starts (the finest grain kept)
            lower = start_of_interval(date_range.date_from, "hour")
        else:
            lower = start_of_interval(date_range.date_from, self.interval, self.project.week_start_day)
        return Period(date_range, buckets, label, lower)

    def _previous(self, current: Period) -> Period:
        """The previous period (§6.7, §19.3): shifted back by the range length, as many buckets;
        with `compare_to`, starting at that offset from date_from instead."""
        r = current.range
        length = r.date_to - r.date_from
        if self.request.compare_to:
            try:
                start, _ = relative_date_parse(self.request.compare_to, self.tz, r.date_from)
            except ValueError as exc:
                raise RequestError(str(exc), "compare_to") from exc
            start = start_of_interval(start, self.interval, self.project.week_start_day)
            return self._period(QueryDateRange(start, start + length, self.interval, r.week_start), "previous",
                                count=len(current.buckets))
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
        if self.request.date_to and not is_absolute(self.request.date_to):
            return False
        number, unit = text.lstrip("-")[:-1], text[-1:]
        return unit in _RELATIVE_WEEKS and number.isdigit() and (unit == "w" or int(number) % 7 == 0)

    def _day_groups(self, period: Period) -> list[list[str | int]]:
        """Per result bucket, the stored buckets it combines: project-zone days (`YYYYMMDD`), and
        hours (epoch s) for a day the range starts inside (an hour-precise `date_from` on a daily
        trend counts from that hour, not from midnight)."""
        groups: list[list[str | int]] = []
        for start in period.buckets:
            end = next_bucket(start, self.interval) - timedelta(microseconds=1)
            first, last = max(start, period.lower), min(end, period.range.date_to)
            group: list[str | int] = []
            midnight = first.replace(hour=0, minute=0, second=0, microsecond=0)
            if first > midnight and first <= last:
                following = next_bucket(midnight, "day")
                hour = int(first.replace(minute=0, second=0, microsecond=0).timestamp())
                while hour < following.timestamp() and hour <= last.timestamp():
                    group.append(hour)
                    hour += 3600
                first = following
            group += day_keys(first, last) if first <= last else []
            groups.append(group)
        return groups

    def _event_names(self, entity: Entity) -> list[str]:
        if entity.id is not None:
            return [entity.id]
        if self._names is None:
            self._names = self.state.event_names(self.project.id)
        return self._names

    def definitions(self) -> list[Definition]:
        """The materializations this request reads (registered and built before it can answer)."""
        unique = {d.hash: d for d in self._definitions.values() if d is not None}
        return list(unique.values())

    # --- counting maths --------------------------------------------------------------------------
    def _counts(self, period: Period, names: list[str], source: Source) -> list[int]:
        groups = self._bucket_groups(period)
        days = [d for g in groups for d in g if isinstance(d, str)]
        hours = [h for g in groups for h in g if isinstance(h, int)]
        out = [0] * len(groups)
        for stored in self.state.counts(source, names, days, hours):
            for i, group in enumerate(groups):
                out[i] += sum(stored[b] for b in group)
        return out

    # --- actor maths: which person sets make up each bucket --------------------------------------
    def _actor_keys(self, entity: Entity, period: Period, source: Source, names: list[str]) -> list[list[str]]:
        window = _WINDOW_DAYS.get(entity.math)
        degrade = window is None or self.interval == "month" or (window == 7 and self.interval == "week")
        if degrade:
            if self.interval == "hour":
                return [[source.hour_persons(n, int(b.timestamp())) for n in names] for b in period.buckets]
            return [[source.persons(n, b) for n in names for b in group]
                    for group in self._day_groups(period)]
        assert window is not None
        if self.interval == "hour":
            return [self._hour_window(source, names, int(b.timestamp()), window) for b in period.buckets]
        out = []
        for start in period.buckets:
            last = start.date()
            days = [(last - timedelta(days=i)).strftime("%Y%m%d") for i in range(window)]
            out.append([source.day_persons(n, d) for n in names for d in days])
        return out

    def _hour_window(self, source: Source, names: list[str], hour: int, days: int) -> list[str]:
        """Trailing window of `days` ending with this hour (§19.11): whole days as day sets."""
        hours = [hour - 3600 * i for i in range(days * 24)]
        by_day: dict[str, list[int]] = {}
        for h in hours:
            by_day.setdefault(bucket_day(h * 1000, self.tz), []).append(h)
        out = []
        for day, members in by_day.items():
            first_of_day = datetime.strptime(day, "%Y%m%d").replace(tzinfo=self.tz)
            whole = len(members) == round((next_bucket(first_of_day, "day") - first_of_day).total_seconds() / 3600)
            if whole:
                out += [source.day_persons(n, day) for n in names]
            else:
                out += [source.hour_persons(n, h) for n in names for h in members]
        return out

    def _distinct_per_bucket(self, key_lists: list[list[str]]) -> list[int]:
        """Distinct actors per bucket. A single bitmap is counted in Redis (BITCOUNT); unions
        (sliding windows, week buckets) fetch each bitmap once and OR them here."""
        if all(len(members) <= 1 for members in key_lists):
            return self.state.bitcounts([members[0] if members else None for members in key_lists])
        bitmaps = self.state.bitmaps(key_lists)
        return [union(bitmaps, members).bit_count() for members in key_lists]

    def _cumulative_distinct(self, key_lists: list[list[str]]) -> list[int]:
        """Each actor counts once, in the first bucket it appears (E3 cumulative for actor maths)."""
        bitmaps = self.state.bitmaps(key_lists)
        seen = 0
        out = []
        for members in key_lists:
            seen |= union(bitmaps, members)
            out.append(seen.bit_count())
        return out

    def _distinct_total(self, entity: Entity, period: Period, source: Source, names: list[str]) -> int:
        """Distinct actors over the whole range; weekly/monthly: the window ending at date_to (§6.6)."""
        window = _WINDOW_DAYS.get(entity.math)
        if window is None:
            if self.interval == "hour":
                members = [source.hour_persons(n, int(b.timestamp())) for n in names for b in period.buckets]
            else:
                members = [source.persons(n, b) for n in names for g in self._day_groups(period) for b in g]
        else:
            last = period.range.date_to.date()
            members = [source.day_persons(n, (last - timedelta(days=i)).strftime("%Y%m%d"))
                       for n in names for i in range(window)]
        return union(self.state.bitmaps([members]), members).bit_count() if members else 0

    # --- property maths and per-actor maths (definition state only) -----------------------------------
    def _bucket_groups(self, period: Period) -> list[list[Bucket]]:
        """Per result bucket, the stored buckets it combines (hour starts as ints, days as YYYYMMDD)."""
        if self.interval == "hour":
            return [[int(b.timestamp())] for b in period.buckets]
        return self._day_groups(period)

    def _property_math(self, entity: Entity, period: Period, source: Source, names: list[str],
                       whole_range: bool) -> list[float]:
        groups = self._bucket_groups(period)
        if whole_range:
            groups = [[b for g in groups for b in g]]
        if entity.math in QUANTILES:
            q = QUANTILES[entity.math]
            return [quantile(values, q) for values in self.state.values(source.prefix, names, groups)]
        totals = [[0.0, 0, None, None] for _ in groups]
        for per_group in self.state.value_stats(source.prefix, names, groups):
            for acc, buckets in zip(totals, per_group, strict=True):
                for s_, n_, mn, mx in buckets:
                    acc[0] += s_
                    acc[1] += n_
                    acc[2] = mn if acc[2] is None else min(acc[2], mn)
                    acc[3] = mx if acc[3] is None else max(acc[3], mx)
        math = entity.math
        out = []
        for total, count, low, high in totals:
            if math == "sum":
                out.append(total)
            elif math == "avg":
                out.append(total / count if count else 0.0)
            elif math == "min":
                out.append(low if low is not None else 0.0)
            else:
                out.append(high if high is not None else 0.0)
        return out

    def _per_actor_math(self, entity: Entity, period: Period, source: Source, names: list[str],
                        whole_range: bool) -> list[float]:
        groups = self._bucket_groups(period)
        if whole_range:
            groups = [[b for g in groups for b in g]]
        how = entity.math.removesuffix("_count_per_actor")
        out = []
        for per_actor in self.state.events_per_person(source.prefix, names, groups):
            counts = [float(c) for c in per_actor.values()]
            if not counts:
                out.append(0.0)
            elif how == "avg":
                out.append(sum(counts) / len(counts))
            elif how == "min":
                out.append(min(counts))
            elif how == "max":
                out.append(max(counts))
            else:
                out.append(quantile(counts, QUANTILES[how]))
        return out

    # --- one series (or one breakdown value of it) in one period ---------------------------------
    def _values(self, entity: Entity, period: Period, source: Source, names: list[str]
                ) -> tuple[list, list | None, float | None]:
        """(per-bucket values, cumulative values if asked, aggregated value if a total display)."""
        cumulative = self.request.display == "ActionsLineGraphCumulative"
        total_value = self.request.total_value
        if entity.math in ACTOR_MATHS:
            if total_value:
                return [], None, self._distinct_total(entity, period, source, names)
            key_lists = self._actor_keys(entity, period, source, names)
            data = self._distinct_per_bucket(key_lists)
            return data, self._cumulative_distinct(key_lists) if cumulative else None, None
        if entity.math in PROPERTY_MATHS or entity.math in PER_ACTOR_MATHS:
            compute = self._property_math if entity.math in PROPERTY_MATHS else self._per_actor_math
            if total_value:
                return [], None, compute(entity, period, source, names, whole_range=True)[0]
            data = compute(entity, period, source, names, whole_range=False)
            return data, _running(data) if cumulative else None, None
        if entity.math == "first_time_for_user":
            data = self._counts(period, names, Source.first_times(self.project.id))
        else:
            data = self._counts(period, names, source)
        if total_value:
            return [], None, sum(data)
        return data, _running(data) if cumulative else None, None

    def _object(self, period: Period, label: str, action: dict[str, Any] | None, order: int | None,
                data: list, cumulative: list | None, aggregated: float | None) -> dict[str, Any]:
        total_value = self.request.total_value
        shown = cumulative if cumulative is not None else data
        if self.request.smoothing > 1 and not total_value:
            shown = _smooth(shown, self.request.smoothing)
        result: dict[str, Any] = {
            "data": [] if total_value else shown,
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

    # --- breakdowns ------------------------------------------------------------------------------
    def _breakdown_values(self, definition: Definition) -> list[str]:
        return self.state.breakdown_values(keys.definition_prefix(self.project.id, definition.hash))

    def _present(self, period: Period, source: Source, names: list[str]) -> bool:
        return sum(self._counts(period, names, source)) > 0

    def _series_breakdown(self, entity: Entity, period: Period, definition: Definition
                          ) -> list[tuple[Any, tuple[list, list | None, float | None]]]:
        """[(breakdown value, values)] in PostHog's order: top values by total, null, then other."""
        source = Source.definition(self.project.id, definition.hash)
        breakdown = definition.breakdown
        assert breakdown is not None
        values = [bv for bv in self._breakdown_values(definition) if self._present(period, source, [bv])]
        if self.request.histogram_bins:
            return [(label, self._values(entity, period, source, names))
                    for label, names in histogram_bins(values, self.request.histogram_bins)]
        computed = {bv: self._values(entity, period, source, [bv]) for bv in values}

        def total(bv: str) -> float:
            data, _, aggregated = computed[bv]
            return float(aggregated or 0) if self.request.total_value else float(sum(data))

        null = BREAKDOWN_NULL if not breakdown.multiple else None
        kept, rest = kept_values([bv for bv in values if bv != null], total, breakdown.multiple,
                                 self.request.breakdown_limit)
        out = [(bv, computed[bv]) for bv in kept]
        if null is not None and null in computed:
            out.append((null, computed[null]))
        if rest and not self.request.hide_other:
            other = orjson.dumps([BREAKDOWN_OTHER] * len(breakdown.properties)).decode() if breakdown.multiple \
                else BREAKDOWN_OTHER
            out.append((other, self._values(entity, period, source, rest)))
        return out

    def _breakdown_object(self, entity: Entity, period: Period, bv: str, definition: Definition,
                          computed: tuple[list, list | None, float | None], label_prefix: str | None
                          ) -> dict[str, Any]:
        assert definition.breakdown is not None
        value: Any = orjson.loads(bv) if definition.breakdown.multiple else bv
        shown = "::".join(value) if isinstance(value, list) else value
        label = f"{label_prefix} - {shown}" if label_prefix else shown
        action = entity.action_dict([iso_instant(b) for b in period.buckets])
        data, cumulative, aggregated = computed
        result = self._object(period, label, action, entity.index, data, cumulative, aggregated)
        result["breakdown_value"] = value
        return result

    # --- the whole request -----------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        if self.request.breakdown is not None:
            return self._run_breakdown()
        computed = {}
        for entity in self.request.entities:
            source, names = self._source(entity)
            for i, period in enumerate(self.periods):
                computed[(entity.index, i)] = self._values(entity, period, source, names)
        if self.formula is not None:
            return [self._formula_object(i, p, computed) for i, p in enumerate(self.periods)]
        out = []
        for entity in self.request.entities:
            for i, period in enumerate(self.periods):
                data, cumulative, aggregated = computed[(entity.index, i)]
                action = entity.action_dict([iso_instant(b) for b in period.buckets])
                out.append(self._object(period, entity.label, action, entity.index, data, cumulative, aggregated))
        return out

    def _source(self, entity: Entity) -> tuple[Source, list[str]]:
        definition = self._definitions[entity.index]
        if definition is None:
            return Source.always_on(self.project.id), self._event_names(entity)
        return Source.definition(self.project.id, definition.hash), [NO_BREAKDOWN]

    def _run_breakdown(self) -> list[dict[str, Any]]:
        several = len(self.request.entities) > 1
        if self.formula is not None:
            return [obj for i, p in enumerate(self.periods) for obj in self._formula_breakdown(i, p)]
        out = []
        for entity in self.request.entities:
            definition = self._definitions[entity.index]
            assert definition is not None
            for period in self.periods:
                for bv, computed in self._series_breakdown(entity, period, definition):
                    out.append(self._breakdown_object(entity, period, bv, definition, computed,
                                                      entity.label if several else None))
        return out

    def _formula_breakdown(self, i: int, period: Period) -> list[dict[str, Any]]:
        """One formula result per breakdown value found in any series; a missing side is 0 (§19.6)."""
        assert self.formula is not None
        per_series: list[dict[str, tuple[list, list | None, float | None]]] = []
        multiple = False
        for entity in self.request.entities:
            definition = self._definitions[entity.index]
            assert definition is not None and definition.breakdown is not None
            multiple = definition.breakdown.multiple
            source = Source.definition(self.project.id, definition.hash)
            values = [bv for bv in self._breakdown_values(definition) if self._present(period, source, [bv])]
            per_series.append({bv: self._values(entity, period, source, [bv]) for bv in values})
        every = sorted({bv for series in per_series for bv in series})
        zeros = ([0] * len(period.buckets), None, 0)
        results = []
        for bv in every:
            rows = [series.get(bv, zeros) for series in per_series]
            if self.request.total_value:
                value = self.formula.evaluate([r[2] or 0 for r in rows])
                results.append((bv, [], None, value, value))
            else:
                data = self.formula.pointwise([r[0] for r in rows])
                cumulative = _running(data) if self.request.display == "ActionsLineGraphCumulative" else None
                results.append((bv, data, cumulative, None, sum(data)))
        null = None if multiple else BREAKDOWN_NULL
        totals = {r[0]: r[4] for r in results}
        order = {bv: i for i, bv in enumerate(shown_order([bv for bv in totals if bv != null], totals.__getitem__,
                                                          multiple))}
        results.sort(key=lambda r: order.get(r[0], len(order)))  # the null value last
        out = []
        for bv, data, cumulative, aggregated, _ in results:
            obj = self._object(period, f"Formula ({self.formula.text})", None, None, data, cumulative, aggregated)
            obj["breakdown_value"] = orjson.loads(bv) if multiple else bv
            out.append(obj)
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


def _value_key(bv: str, multiple: bool) -> Any:
    return tuple(orjson.loads(bv)) if multiple else bv  # several properties compare part by part


def kept_values(values: list[str], total: Callable[[str], float], multiple: bool, limit: int
                ) -> tuple[list[str], list[str]]:
    """(values shown, values folded into Other), shown ones in display order. PostHog keeps the
    values with the largest aggregated value over the range, ties by the value descending (its
    breakdown-values query sorts `count DESC, value DESC`), and shows them by `shown_order`."""
    chosen = sorted(values, key=lambda bv: (total(bv), _value_key(bv, multiple)), reverse=True)
    return shown_order(chosen[:limit], total, multiple), chosen[limit:]


def shown_order(values: list[str], total: Callable[[str], float], multiple: bool) -> list[str]:
    """Display order of breakdown series: aggregated value descending, ties by the value ascending
    (E3 orders its result rows `arraySum(total) DESC, breakdown_value ASC`)."""
    return sorted(values, key=lambda bv: (-total(bv), _value_key(bv, multiple)))


def histogram_bins(values: list[str], bins: int) -> list[tuple[str, list[str]]]:
    """Equal-width bins between the smallest and largest numeric value (§6.9, §19.18): the last
    upper edge is max + 0.01; labels `[lo,hi]` in shortest numeric form; empty bins are left out."""
    numbers = {bv: float(bv) for bv in values if _is_number(bv)}
    if not numbers:
        return []
    low, high = min(numbers.values()), max(numbers.values())
    width = (high - low) / bins
    edges = [round(low + i * width, 2) for i in range(bins)] + [round(high + 0.01, 2)]
    out = []
    for i in range(bins):
        inside = [bv for bv, v in numbers.items() if edges[i] <= v < edges[i + 1] or (i == bins - 1 and v >= edges[i])]
        if inside:
            out.append((f"[{_shortest(edges[i])},{_shortest(edges[i + 1])}]", sorted(inside)))
    return out


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _shortest(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _smooth(values: list, window: int) -> list[int]:
    """Moving average over the last `window` points that exist, floored (§6.6)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(math.floor(sum(part) / len(part)))
    return out


def union(bitmaps: dict[str, int], members: list[str]) -> int:
    """The OR of some of the fetched person bitmaps."""
    out = 0
    for key in members:
        out |= bitmaps[key]
    return out


def quantile(values: list[float] | np.ndarray, q: float) -> float:
    """Exact quantile with linear interpolation (PostHog's ClickHouse `quantile` is an estimate)."""
    if not len(values):
        return 0.0
    ordered = np.sort(values) if isinstance(values, np.ndarray) else sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    value = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return value.item() if isinstance(value, np.generic) else value


def _running(values: list) -> list:
    out, total = [], 0
    for value in values:
        total += value
        out.append(total)
    return out


def resolve_now(header: str | None, test_clock: bool, default: datetime) -> datetime:
    """The request's "now": the test clock header when enabled (CONTRACT.md), else wall clock."""
    if test_clock and header:
        moment, _ = relative_date_parse(header, zone("UTC"), default)
        return moment
    return default
