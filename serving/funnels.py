"""Funnel results (spec §7) from the funnel definition's state: the events it keeps per day.

A query reads the days of its range, keeps the events inside [date_from, date_to] (the range applies
to every step, §7.3), groups them by person and runs the step-matching operator per actor with the
requested window, order type and breakdown attribution.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import redis

from dataflows.operators.funnels import FunnelResult, StepEvent, funnel, ordered_attempts
from schemas import keys
from schemas.dates import QueryDateRange, bucket_label, day_string, start_of_interval, zone
from schemas.definitions import BREAKDOWN_NULL
from schemas.funnels import FunnelRequest
from schemas.registry import Project
from schemas.trends import RequestError
from serving.trends import quantile

OTHER = "Other"


@dataclass(frozen=True)
class ActorResult:
    person: str
    value: tuple[str, ...]  # boxed breakdown value ("" = no value)
    result: FunnelResult


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(k for k in range(1, mask.bit_length()) if mask >> k & 1)


class FunnelQuery:
    def __init__(self, client: redis.Redis, project: Project, request: FunnelRequest, now: datetime) -> None:
        self.redis, self.project, self.request = client, project, request
        self.tz = zone(project.timezone)
        interval = request.interval if request.viz == "trends" else "day"
        if interval not in ("hour", "day", "week", "month"):
            raise RequestError(f"Unknown interval '{interval}'.", "interval", "invalid_choice")
        try:
            self.range = QueryDateRange.resolve(date_from=request.date_from, date_to=request.date_to, interval=interval,
                                                tz=self.tz, now=now, week_start=project.week_start_day)
        except ValueError as exc:
            raise RequestError(str(exc), "date_from") from exc
        self.interval = interval
        self.lower = start_of_interval(self.range.date_from, interval, project.week_start_day)
        self.steps = len(request.definition.steps)
        self._actors: dict[str, list[StepEvent]] | None = None

    def definitions(self) -> list[Any]:
        return [self.request.definition]

    # --- state -----------------------------------------------------------------------------------
    def actors(self) -> dict[str, list[StepEvent]]:
        """Each person's kept events inside the range."""
        if self._actors is not None:
            return self._actors
        prefix = keys.definition_prefix(self.project.id, self.request.definition.hash)
        days, day = [], self.lower.date()
        while day <= self.range.date_to.date():
            days.append(day.strftime("%Y%m%d"))
            day += timedelta(days=1)
        pipe = self.redis.pipeline(transaction=False)
        for d in days:
            pipe.lrange(f"{prefix}fe:{d}", 0, -1)
        low, high = self.lower.timestamp() * 1000, self.range.date_to.timestamp() * 1000
        actors: dict[str, list[StepEvent]] = defaultdict(list)
        for entries in pipe.execute():
            for raw in entries:
                person, ts, uuid, steps, excluded, bv = raw.decode().split("|", 5)
                ts_ms = int(ts)
                if low <= ts_ms <= high:
                    actors[person].append(StepEvent(ts_ms / 1000, uuid, _bits(int(steps)), _bits(int(excluded)), bv))
        self._actors = self._first_times(dict(actors))
        return self._actors

    def _first_times(self, actors: dict[str, list[StepEvent]]) -> dict[str, list[StepEvent]]:
        """A first-time step only matches the person's first ever event of that name (always-on state)."""
        persons = list(actors)
        for k in self.request.first_time_steps:
            name = self.request.entities[k - 1].id
            if not persons or name is None:
                continue
            firsts = self.redis.hmget(keys.first_seen(self.project.id, name), persons)
            for person, raw in zip(persons, firsts, strict=True):
                first_ms = int(raw.decode().split(":")[0]) if raw else None
                actors[person] = [e if k not in e.steps or (first_ms is not None and round(e.ts * 1000) == first_ms)
                                  else StepEvent(e.ts, e.uuid, tuple(s for s in e.steps if s != k), e.exclusions,
                                                 e.breakdown) for e in actors[person]]
        return actors

    def _box(self, bv: str) -> tuple[str, ...]:
        breakdown = self.request.definition.breakdown
        if breakdown is None:
            return ()
        parts = orjson.loads(bv) if breakdown.multiple else [bv]
        return tuple("" if p in (BREAKDOWN_NULL, None) else str(p) for p in parts)

    # --- per actor, with breakdown attribution (§7.6) -------------------------------------------
    def results(self) -> list[ActorResult]:
        request, out = self.request, []
        for person, events in self.actors().items():
            if request.definition.breakdown is None:
                result = funnel(events, self.steps, request.window_s, request.order)
                if result is not None and result.steps_reached:
                    out.append(ActorResult(person, (), result))
                continue
            out += self._attributed(person, events)
        return out

    def _attributed(self, person: str, events: list[StepEvent]) -> list[ActorResult]:
        request = self.request
        ordered_events = sorted(events, key=lambda e: (e.ts, e.uuid))
        step_events = [e for e in ordered_events if e.steps]
        valued = [e for e in step_events if any(self._box(e.breakdown))]
        attribution = request.attribution
        if attribution in ("first_touch", "last_touch"):
            chosen = valued[0 if attribution == "first_touch" else -1] if valued else None
            value = self._box(chosen.breakdown) if chosen else self._box("")
            result = funnel(events, self.steps, request.window_s, request.order)
            return [ActorResult(person, value, result)] if result and result.steps_reached else []
        if attribution == "all_events":
            out = []
            for value in dict.fromkeys(self._box(e.breakdown) for e in step_events):
                subset = [e for e in events if self._box(e.breakdown) == value or not e.steps]
                result = funnel(subset, self.steps, request.window_s, request.order)
                if result and result.steps_reached:
                    out.append(ActorResult(person, value, result))
            return out
        step = (request.attribution_step or 0) + 1
        candidates = list(dict.fromkeys(self._box(e.breakdown) for e in step_events if step in e.steps))
        out = []
        for value in candidates:
            subset = [e if step not in e.steps or self._box(e.breakdown) == value
                      else StepEvent(e.ts, e.uuid, tuple(k for k in e.steps if k != step), e.exclusions, e.breakdown)
                      for e in events]
            result = funnel(subset, self.steps, request.window_s, request.order)
            if result and result.steps_reached >= step:
                out.append(ActorResult(person, value, result))
        if not out:
            result = funnel(events, self.steps, request.window_s, request.order)
            if result and result.steps_reached:
                out.append(ActorResult(person, self._box(""), result))
        return out

    def groups(self) -> list[tuple[tuple[str, ...], list[ActorResult]]]:
        """Breakdown groups by step-1 count (descending), null last, the rest folded into Other."""
        by_value: dict[tuple[str, ...], list[ActorResult]] = defaultdict(list)
        for actor in self.results():
            by_value[actor.value].append(actor)
        if self.request.definition.breakdown is None:
            return [((), by_value.get((), []))]
        empty = tuple("" for _ in self.request.definition.breakdown.properties)
        ranked = sorted((v for v in by_value if v != empty), key=lambda v: (-len(by_value[v]), v))
        limit = self.request.breakdown_limit
        out = [(v, by_value[v]) for v in ranked[:limit]]
        if len(ranked) > limit:
            folded = [a for v in ranked[limit:] for a in by_value[v]]
            out.append(((OTHER,) * len(empty), folded))
        if empty in by_value:
            out.append((empty, by_value[empty]))
        return out

    # --- views -----------------------------------------------------------------------------------
    def run(self, people_url: Any = None) -> Any:
        viz = self.request.viz
        if viz == "time_to_convert":
            return self._time_to_convert([a for _, group in self.groups() for a in group])
        if viz == "trends":
            return self._trends()
        groups = self.groups()
        if self.request.definition.breakdown is None:
            return self._steps((), groups[0][1], people_url)
        return [self._steps(value, actors, people_url) for value, actors in groups]

    def _step_meta(self, i: int) -> dict[str, Any]:
        entity = self.request.entities[i]
        if self.request.order == "unordered":
            name = f"Completed {i + 1} step{'s' if i else ''}"
            return {"action_id": None, "name": name, "custom_name": None, "type": entity.type}
        name = entity.name if entity.id is not None or entity.type == "actions" else None
        return {"action_id": entity.id, "name": name, "custom_name": entity.custom_name, "type": entity.type}

    def _steps(self, value: tuple[str, ...], actors: list[ActorResult], people_url: Any) -> list[dict[str, Any]]:
        out = []
        for i in range(self.steps):
            reached = [a for a in actors if a.result.steps_reached >= i + 1]
            gaps = [a.result.gaps[i - 1] for a in reached if i > 0 and a.result.gaps[i - 1] > 0]
            step: dict[str, Any] = {
                **self._step_meta(i), "order": i, "people": [], "count": len(reached),
                "average_conversion_time": sum(gaps) / len(gaps) if gaps else None,
                "median_conversion_time": quantile(gaps, 0.5) if gaps else None,
            }
            if people_url is not None:
                step["converted_people_url"] = people_url(i + 1, value)
                step["dropped_people_url"] = people_url(-(i + 1), value) if i else None
            if self.request.definition.breakdown is not None:
                shown: Any = list(value)
                if self.request.unbox and len(shown) == 1:
                    shown = shown[0]
                step["breakdown"] = shown
                step["breakdown_value"] = shown
            out.append(step)
        return out

    def people(self, funnel_step: int, breakdown: tuple[str, ...] | None) -> list[str]:
        """Persons at (positive) or dropped before (negative) a 1-based step (§7.7 people URLs)."""
        chosen = []
        for value, actors in self.groups():
            if breakdown is not None and value != breakdown:
                continue
            for a in actors:
                reached = a.result.steps_reached
                if (funnel_step > 0 and reached >= funnel_step) or (funnel_step < 0 and reached == -funnel_step - 1):
                    chosen.append(a.person)
        return list(dict.fromkeys(chosen))

    def _time_to_convert(self, actors: list[ActorResult]) -> dict[str, Any]:
        """Histogram of step `from` -> `to` conversion times (§7.11)."""
        start, end = self.request.from_step, self.request.to_step
        sample = [a.result.timestamps[end] - a.result.timestamps[start] for a in actors
                  if a.result.steps_reached >= end + 1]
        if not sample:
            return {"bins": [], "average_conversion_time": None}
        count = self.request.bin_count or max(1, min(60, math.ceil(len(sample) ** (1 / 3) - 1e-9)))
        low, high = math.floor(min(sample)), math.ceil(max(sample))
        width = math.ceil((high - low) / count) or 60
        bins = [0] * (count + 1)
        for value in sample:
            bins[min(count, int((value - low) // width))] += 1
        return {"bins": [[low + k * width, bins[k]] for k in range(count + 1)],
                "average_conversion_time": sum(sample) / len(sample)}

    def _trends(self) -> list[dict[str, Any]]:
        """Conversion rate per entrance period (§7.10, §19.12)."""
        request = self.request
        buckets = self.range.buckets()
        index = {int(b.timestamp()): i for i, b in enumerate(buckets)}
        entered = [set() for _ in buckets]
        converted = [set() for _ in buckets]
        for person, events in self.actors().items():
            attempts = ordered_attempts(events, self.steps, request.window_s, request.order)
            if attempts is None:
                continue  # disqualified by an exclusion: removed from every period (§19.7)
            for start, reached in attempts:
                bucket = int(start_of_interval(datetime.fromtimestamp(start, self.tz), self.interval,
                                               self.project.week_start_day).timestamp())
                i = index.get(bucket)
                if i is None:
                    continue
                if reached >= request.from_step + 1:
                    entered[i].add(person)
                if reached >= request.to_step + 1:
                    converted[i].add(person)
        from_counts = [len(s) for s in entered]
        to_counts = [len(s) for s in converted]
        rates = [round(100 * t / f, 2) if f else 0 for f, t in zip(from_counts, to_counts, strict=True)]
        return [{
            "count": len(buckets), "data": rates, "days": [day_string(b, self.interval) for b in buckets],
            "labels": [bucket_label(b, self.interval, self.range) if self.interval != "day"
                       else f"{b.day}-{b.strftime('%b-%Y')}" for b in buckets],
            "reached_from_step_count": from_counts, "reached_to_step_count": to_counts,
            "filter": request.raw, "action": None,
        }]

