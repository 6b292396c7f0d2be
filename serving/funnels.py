"""Funnel results (spec §7) from the funnel definition's state.

Ordered funnels without exclusions, breakdown or first-time steps read attempt summaries: the rows
of the attempts starting in the range (one hash per start day, cached here per day version),
evaluated for the requested window and range at once (`dataflows/operators/funnel_attempts.py`);
the few persons with two step events at one instant are evaluated by the UDF over their events.
Everything else reads the events the definition keeps per day, keeps those inside
[date_from, date_to] (the range applies to every step, §7.3), groups them by person and runs the
step-matching operator per actor with the requested window, order type and breakdown attribution.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis

from dataflows.operators.funnel_attempts import Outcomes, best_attempts, entrances, outcomes
from dataflows.operators.funnel_correlation import (
    CorrelationEvents,
    column_outcomes,
    correlation_columns,
    event_correlation,
)
from dataflows.operators.funnels import FunnelResult, StepEvent, funnel, ordered_attempts, step_bits
from dataflows.operators.history import kept_values
from dataflows.operators.history_summaries import flat
from dataflows.operators.summaries import PersonSummary, summarise_groups, unusable
from schemas.dates import QueryDateRange, bucket_label, day_keys, day_string, start_of_interval, zone
from schemas.fields import decode_json_field
from schemas.filters import as_text
from schemas.funnels import FunnelRequest, read_kept
from schemas.projects import Project
from schemas.settings import Settings
from schemas.trends import RequestError
from serving.compute import AnsweredFromArchive, Computation, archive_complete, no_collection
from serving.people import person_details
from serving.trends import quantile
from state import keys
from state.archive import HOT_PROPERTIES, Archive
from state.records import read_attempt_rows, read_day_event, read_day_rows, read_person_events, read_touches
from state.summaries import SUMMARIES, SummaryStore

OTHER = "Other"


@dataclass(frozen=True)
class ActorResult:
    person: str
    value: tuple[str, ...]  # boxed breakdown value ("" = no value)
    result: FunnelResult


def _outcomes(actors: list[ActorResult], steps: int) -> Outcomes:
    reached = np.array([a.result.steps_reached for a in actors], dtype=np.int64)
    times = np.full((len(actors), steps), np.nan)
    for i, actor in enumerate(actors):
        times[i, :len(actor.result.timestamps)] = actor.result.timestamps
    return Outcomes(np.array([int(a.person) for a in actors], dtype=np.int64), reached, times)


Touches = tuple[np.ndarray, np.ndarray, np.ndarray]  # (ms, values, persons)


def _decode_touches(values: list[bytes]) -> tuple[Touches, Touches]:
    """A day's `fb` summaries as (first touches, last touches)."""
    decoded = read_touches(values)
    who = np.array([d[0] for d in decoded], dtype=np.int64)
    first = (np.array([d[1] for d in decoded], dtype=np.int64), np.array([d[2] for d in decoded], dtype=object), who)
    last = (np.array([d[3] for d in decoded], dtype=np.int64), np.array([d[4] for d in decoded], dtype=object), who)
    return first, last


def _combine_touches(days: list[tuple[Touches, Touches]]) -> tuple[Touches, Touches]:
    def join(side: int) -> Touches:
        if not days:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64)
        return tuple(np.concatenate([d[side][i] for d in days]) for i in range(3))  # type: ignore[return-value]

    return join(0), join(1)


def rank_breakdown_groups(reached: dict[tuple[str, ...], Any], steps: int) -> list[tuple[str, ...]]:
    """Breakdown values ordered by how many of their actors reached the last step, descending; ties by
    how many entered (step 1), then by the value. `reached[value]`: the steps each actor reached.

    PostHog's own tests of one version order Chrome (1, 1, 1), then Safari 14 (1, 0, 0), then Safari
    15 (1, 1, 0): a tie on the last step is not broken by the middle steps."""
    def key(value: tuple[str, ...]) -> tuple[int, int, tuple[str, ...]]:
        per_step = np.bincount(np.asarray(reached[value], dtype=np.int64), minlength=steps + 1)
        at_least = np.cumsum(per_step[::-1])[::-1]  # at_least[k]: actors reaching step k or further
        return -int(at_least[steps]), -int(at_least[1]), value

    return sorted(reached, key=key)


class FunnelQuery(AnsweredFromArchive, Computation):
    """A funnel. An ordered funnel not broken down that reads only the event is answered from the
    event archive's columns while its definition is still being built (the first ask of a new
    funnel): the same attempt rule over the same events, so the same numbers, without waiting for
    the definition's backfill and summaries; once it is ready, its summaries answer."""

    def __init__(self, client: redis.Redis, project: Project, request: FunnelRequest, now: datetime,
                 archive: Archive | None = None,
                 backlog_persons: int = Settings.archive_backlog_persons) -> None:
        self.redis, self.project, self.request = client, project, request
        definition = request.definition
        by_columns = (definition.summaries and definition.breakdown is None and definition.columnar
                      and request.viz in ("steps", "time_to_convert"))
        self._candidate = archive if by_columns else None
        self._backlog_persons = backlog_persons
        self.tz = zone(project.timezone)
        interval = request.interval if request.viz == "trends" else "day"
        if interval not in ("hour", "day", "week", "month"):
            raise RequestError(f"Unknown interval '{interval}'.", "interval", "invalid_choice")
        try:
            self.range = QueryDateRange.resolve(date_from=request.date_from, date_to=request.date_to, interval=interval,
                                                tz=self.tz, now=now, week_start=project.week_start_day,
                                                explicit=request.explicit_date)
        except ValueError as exc:
            raise RequestError(str(exc), "date_from") from exc
        self.interval = interval
        self.lower = (self.range.date_from if request.explicit_date
                      else start_of_interval(self.range.date_from, interval, project.week_start_day))
        self.steps = len(request.definition.steps)
        self._actors: dict[str, list[StepEvent]] | None = None
        self._fresh_summaries: dict[str, PersonSummary] | None = None
        self._kept: dict[str, bytes] = {}  # survivors summarised here: their group's kept events
        self._stale: set[str] = set()  # persons whose stored summaries those replace

    def definitions(self) -> list[Any]:
        return [self.request.definition]

    def archived_events(self, archive: Archive) -> CorrelationEvents:
        """The funnel's kept events in the range, from the archive's columns: its own `contribution`
        evaluated once per distinct input as a backfill does, merged persons as the person they became."""
        definition = self.request.definition
        day = timedelta(days=1)  # a day more each side: the project's zone may have moved since
        table = archive.definition_rows(self.project.id, definition.event_names(), definition.event_keys(),
                                        ["person", "event", "timestamp", "uuid"],
                                        (self.lower.date() - day, self.range.date_to.date() + day))
        table, codes, values = kept_values(definition, table, datetime.now(UTC), set(HOT_PROPERTIES))
        _, low, high = self._bounds_ms
        found = correlation_columns(table.column("person").to_numpy(), table.column("timestamp").to_numpy(),
                                    flat(table.column("uuid")), codes, values, self.state.overrides.final, low, high)
        if found is None:  # no exclusions: no kept event can hit one
            raise RuntimeError("an archived event hit an exclusion of a funnel without exclusions")
        return found

    # --- state -----------------------------------------------------------------------------------
    def actors(self) -> dict[str, list[StepEvent]]:
        """Each person's kept events inside the range."""
        if self._actors is not None:
            return self._actors
        prefix = keys.definition_prefix(self.project.id, self.request.definition.hash)
        low, high = self.lower.timestamp() * 1000, self.range.date_to.timestamp() * 1000
        actors: dict[str, list[StepEvent]] = defaultdict(list)
        parsed: dict[str, tuple[Any, ...]] = {}  # a definition keeps few distinct values: each read once
        with no_collection():
            for raw in self.state.day_events(prefix, self._days()):
                person, ts_ms, uuid, payload = read_day_event(raw)
                person = self.state.person(person)  # a merged person's events are its survivor's
                if low <= ts_ms <= high:
                    fields = parsed.get(payload)
                    if fields is None:
                        kept = read_kept(payload)
                        fields = parsed[payload] = (step_bits(kept.steps), step_bits(kept.excluded), kept.breakdown,
                                                    kept.name, kept.properties)
                    actors[person].append(StepEvent(ts_ms / 1000, uuid, *fields))
        self._actors = self._first_times(dict(actors))
        return self._actors

    def correlation_events(self) -> CorrelationEvents | None:
        """The kept events in the range as columns, for event correlation over columns
        (dataflows/operators/funnel_correlation.py): ordered funnels without exclusions or first-time
        steps. None otherwise, or if a kept event cannot be read so (the per-person path reads it)."""
        request = self.request
        if request.order != "ordered" or request.definition.exclusions or request.first_time_steps:
            return None
        prefix = keys.definition_prefix(self.project.id, request.definition.hash)
        raws = self.state.day_events(prefix, self._days())
        try:
            return _event_columns(raws, self.state.overrides.final, self.lower.timestamp() * 1000,
                                  self.range.date_to.timestamp() * 1000)
        except (ValueError, pa.ArrowInvalid):  # a row the per-person path reads (and reports) itself
            return None

    def _days(self) -> list[str]:
        """The project-zone days the range touches (YYYYMMDD)."""
        return day_keys(self.lower, self.range.date_to)

    # --- attempt summaries (ordered funnels) ----------------------------------------------------
    @property
    def summarised(self) -> bool:
        """Answered from attempt summaries; a breakdown's touches are kept per whole day, so a range
        that does not start and end on day boundaries takes the event path."""
        definition = self.request.definition
        if not definition.summaries:
            return False
        if definition.breakdown is None:
            return True
        start, end = self.lower, self.range.date_to
        return (start.hour, start.minute, start.second, start.microsecond) == (0, 0, 0, 0) and (
            end.hour, end.minute, end.second, end.microsecond) == (23, 59, 59, 999999)

    @property
    def _bounds_ms(self) -> tuple[int, int, int]:
        """(window, lowest, highest) in ms, as the event path compares them."""
        return (int(self.request.window_s * 1000), math.ceil(self.lower.timestamp() * 1000),
                math.floor(self.range.date_to.timestamp() * 1000))

    def _fresh(self) -> dict[str, PersonSummary]:
        """Summaries of the persons whose kept events changed since they were summarised (and of
        survivors of merges not summarised yet), computed here (a query writes nothing): with them, the
        answer includes every applied event. Each is made from its whole group's events."""
        if self._fresh_summaries is None:
            definition = self.request.definition
            store = SummaryStore(self.redis)
            dirty = store.dirty(self.project.id, definition.hash)
            groups = store.group_kept(self.project.id, definition.hash, dirty, self.state.overrides)
            self._kept = {s: b"".join(raws.values()) for s, raws in groups.items()}
            self._stale = {m for raws in groups.values() for m in raws}
            self._fresh_summaries = {s: plans[s] for s, plans in summarise_groups(definition, groups).items()}
        return self._fresh_summaries

    def _fresh_values(self, kind: str) -> list[bytes]:
        days = set(self._days())
        return [value for plan in self._fresh().values() for k, day, value in plan.entries
                if k == kind and day in days and value]

    def _attempts(self) -> tuple[np.ndarray, dict[str, list[StepEvent]]]:
        """Rows of the attempts starting on the range's days, and the events (inside the range) of
        the persons evaluated by the UDF: the stored summaries, with those of persons not summarised
        yet computed here instead."""
        definition, project_id = self.request.definition, self.project.id
        # The dirty persons first: one summarised meanwhile is then in both, and its stored rows are
        # replaced by those computed here; read after, it would be in neither.
        fresh = self._fresh()
        store = SummaryStore(self.redis)
        rows, stored_irregular = SUMMARIES.read_consistent(
            self.redis, definition, self._days(),
            lambda _: (SUMMARIES.read_combined(
                self.redis, definition, self._days(), lambda values: read_attempt_rows(values, self.steps),
                lambda days: np.concatenate(days) if days else np.zeros((0, self.steps + 1), dtype=np.int64)),
                store.irregular(project_id, definition.hash)))
        if fresh:
            stale = np.isin(rows[:, 0], np.array([int(p) for p in self._stale], dtype=np.int64))
            rows = np.concatenate([rows[~stale], read_attempt_rows(self._fresh_values("fa"), self.steps)])
        irregular = [p for p in stored_irregular if p not in self._stale]
        irregular += [p for p, plan in fresh.items() if plan.irregular]
        _, low, high = self._bounds_ms
        events: dict[str, list[StepEvent]] = {}
        if irregular:
            stored = [p for p in irregular if p not in self._kept]
            raws = {s: b"".join(group.values()) for s, group in
                    store.group_kept(project_id, definition.hash, stored, self.state.overrides).items()}
            for person in irregular:
                raw = self._kept[person] if person in self._kept else raws[person]
                inside = []
                for e in read_person_events(raw)[0]:
                    if low <= e.ts_ms <= high and unusable("fa", e) is None:
                        kept = read_kept(e.value)
                        inside.append(StepEvent(e.ts_ms / 1000, e.uuid, step_bits(kept.steps),
                                                breakdown=kept.breakdown))
                if inside:
                    events[person] = inside
        return rows, events

    def _summarised_outcomes(self) -> list[tuple[tuple[str, ...], Outcomes]]:
        rows, irregular = self._attempts()
        window, low, high = self._bounds_ms
        fast = outcomes(*best_attempts(rows[:, 0], rows[:, 1:], window, low, high))
        slow: list[ActorResult] = []
        for person, events in irregular.items():
            if self.request.definition.breakdown is None:
                result = funnel(events, self.steps, self.request.window_s, "ordered")
                if result is not None and result.steps_reached:
                    slow.append(ActorResult(person, (), result))
            else:
                slow += self._attributed(person, events)
        if not slow and self.request.definition.breakdown is None:
            return [((), fast)]
        rest = _outcomes(slow, self.steps)
        every = Outcomes(np.concatenate([fast.persons, rest.persons]), np.concatenate([fast.reached, rest.reached]),
                         np.concatenate([fast.times, rest.times]))
        values = self._touches(fast.persons) + [a.value for a in slow]
        by_value: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, value in enumerate(values):
            by_value[value].append(i)
        out = []
        for value, members in self._ranked(by_value, lambda members: every.reached[np.array(members, dtype=np.int64)]):
            at = np.array(members, dtype=np.int64)
            out.append((value, Outcomes(every.persons[at], every.reached[at], every.times[at])))
        return out

    def _touches(self, persons: np.ndarray) -> list[tuple[str, ...]]:
        """Each person's breakdown value by first or last touch: the value of its first (last) step
        event with one in the range, from the per-day first and last such events (whole days)."""
        breakdown = self.request.definition.breakdown
        if breakdown is None:
            return [()] * len(persons)
        last = self.request.attribution == "last_touch"
        sides = SUMMARIES.read_combined(self.redis, self.request.definition, self._days(), _decode_touches,
                                        _combine_touches, kind="fb")
        fresh = self._fresh()
        if fresh:
            stale = np.array([int(p) for p in self._stale], dtype=np.int64)
            kept = tuple(tuple(a[~np.isin(side[2], stale)] for a in side) for side in sides)
            sides = _combine_touches([kept, _decode_touches(self._fresh_values("fb"))])  # type: ignore[list-item]
        touch_ms, touch_values, who = sides[last]
        empty = tuple("" for _ in breakdown.properties)
        if not len(who):
            return [empty] * len(persons)
        size = int(max(who.max(), persons.max() if len(persons) else 0)) + 1
        if last:
            best = np.full(size, -1, dtype=np.int64)
            np.maximum.at(best, who, touch_ms)
        else:
            best = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(best, who, touch_ms)
        chosen = np.flatnonzero(touch_ms == best[who])
        value_of = dict(zip(who[chosen].tolist(), touch_values[chosen].tolist(), strict=True))
        parts: dict[str, tuple[str, ...]] = {}
        out = []
        for person in persons.tolist():
            raw = value_of.get(person)
            if raw is None:
                out.append(empty)
                continue
            if raw not in parts:
                parts[raw] = breakdown.parts(raw)
            out.append(parts[raw])
        return out

    def outcome_groups(self) -> list[tuple[tuple[str, ...], Outcomes]]:
        """Per breakdown group, each actor's steps reached and attempt times."""
        archive = self.answering_archive()
        if archive is not None:
            _, low, high = self._bounds_ms
            events = self.archived_events(archive)
            return [((), column_outcomes(events, self.steps, self.request.window_s, low, high))]
        if self.summarised:
            return self._summarised_outcomes()
        return [(value, _outcomes(actors, self.steps)) for value, actors in self.groups()]

    def _first_times(self, actors: dict[str, list[StepEvent]]) -> dict[str, list[StepEvent]]:
        """A first-time step only matches the person's first ever event of that name (always-on state)."""
        persons = list(actors)
        for k in self.request.first_time_steps:
            name = self.request.entities[k - 1].id
            if not persons or name is None:
                continue
            firsts = self.state.first_seen(self.project.id, name, persons)
            for person, first_ms in zip(persons, firsts, strict=True):
                actors[person] = [e if k not in e.steps or (first_ms is not None and round(e.ts * 1000) == first_ms)
                                  else replace(e, steps=tuple(s for s in e.steps if s != k)) for e in actors[person]]
        return actors

    def _box(self, bv: str) -> tuple[str, ...]:
        breakdown = self.request.definition.breakdown
        return () if breakdown is None else breakdown.parts(bv)

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
        step = (request.attribution_step or 0) + 1 if request.attribution == "step" else 1
        out = []
        for value, subset in self._attributed_events(person, events):
            result = funnel(subset, self.steps, request.window_s, request.order)
            if result and result.steps_reached >= step:
                out.append(ActorResult(person, value, result))
        if not out and request.attribution == "step":  # no value reached the attributed step
            result = funnel(events, self.steps, request.window_s, request.order)
            if result and result.steps_reached:
                out.append(ActorResult(person, self._box(""), result))
        return out

    def groups(self) -> list[tuple[tuple[str, ...], list[ActorResult]]]:
        """Breakdown groups by step-1 count (descending), null last, the rest folded into Other."""
        by_value: dict[tuple[str, ...], list[ActorResult]] = defaultdict(list)
        for actor in self.results():
            by_value[actor.value].append(actor)
        return self._ranked(by_value, lambda actors: np.array([a.result.steps_reached for a in actors]))

    def _ranked(self, by_value: dict[tuple[str, ...], list[Any]], reached: Any
                ) -> list[tuple[tuple[str, ...], list[Any]]]:
        """Breakdown groups of actors in PostHog's order: by the last step's count, descending (ties: the
        earlier steps', then the value), the values beyond `breakdown_limit` folded into Other, Other
        and the null group last. `reached(members)` gives the steps each member reached."""
        if self.request.definition.breakdown is None:
            return [((), by_value.get((), []))]
        empty = tuple("" for _ in self.request.definition.breakdown.properties)
        ranked = rank_breakdown_groups({v: reached(m) for v, m in by_value.items() if v != empty}, self.steps)
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
        if viz == "trends":
            return self._trends()
        groups = self.outcome_groups()
        if viz == "time_to_convert":
            return self._time_to_convert(groups)
        if self.request.definition.breakdown is None:
            return self._steps((), groups[0][1], people_url)
        return [self._steps(value, group, people_url) for value, group in groups]

    def _step_meta(self, i: int) -> dict[str, Any]:
        entity = self.request.entities[i]
        if self.request.order == "unordered":
            name = f"Completed {i + 1} step{'s' if i else ''}"
            return {"action_id": None, "name": name, "custom_name": None, "type": entity.type}
        name = entity.name if entity.id is not None or entity.type == "actions" else None
        return {"action_id": entity.id, "name": name, "custom_name": entity.custom_name, "type": entity.type}

    def _steps(self, value: tuple[str, ...], group: Outcomes, people_url: Any) -> list[dict[str, Any]]:
        out = []
        for i in range(self.steps):
            reached = group.reached >= i + 1
            gaps = np.zeros(0)
            if i:
                gaps = group.times[reached, i] - group.times[reached, i - 1]
                gaps = gaps[gaps > 0]
            step: dict[str, Any] = {
                **self._step_meta(i), "order": i, "people": [], "count": int(reached.sum()),
                "average_conversion_time": float(gaps.sum() / len(gaps)) if len(gaps) else None,
                "median_conversion_time": quantile(gaps, 0.5) if len(gaps) else None,
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
        chosen: list[str] = []
        for value, group in self.outcome_groups():
            if breakdown is not None and value != breakdown:
                continue
            wanted = group.reached >= funnel_step if funnel_step > 0 else group.reached == -funnel_step - 1
            chosen += [str(p) for p in group.persons[wanted].tolist()]
        return list(dict.fromkeys(chosen))

    def _time_to_convert(self, groups: list[tuple[tuple[str, ...], Outcomes]]) -> dict[str, Any]:
        """Histogram of step `from` -> `to` conversion times (§7.11)."""
        start, end = self.request.from_step, self.request.to_step
        sample = [t for _, g in groups
                  for t in (g.times[g.reached >= end + 1, end] - g.times[g.reached >= end + 1, start]).tolist()]
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

    def _attributed_events(self, person: str, events: list[StepEvent]) -> list[tuple[tuple[str, ...], list[StepEvent]]]:
        """(breakdown value, the events the person's funnel runs on under that value), by the
        request's attribution: what `_attributed` evaluates, before evaluating it."""
        request = self.request
        step_events = [e for e in sorted(events, key=lambda e: (e.ts, e.uuid)) if e.steps]
        valued = [e for e in step_events if any(self._box(e.breakdown))]
        if request.attribution in ("first_touch", "last_touch"):
            chosen = valued[0 if request.attribution == "first_touch" else -1] if valued else None
            return [(self._box(chosen.breakdown) if chosen else self._box(""), events)]
        if request.attribution == "all_events":
            return [(value, [e for e in events if self._box(e.breakdown) == value or not e.steps])
                    for value in dict.fromkeys(self._box(e.breakdown) for e in step_events)]
        step = (request.attribution_step or 0) + 1
        out = [(value, [e if step not in e.steps or self._box(e.breakdown) == value
                        else replace(e, steps=tuple(k for k in e.steps if k != step)) for e in events])
               for value in dict.fromkeys(self._box(e.breakdown) for e in step_events if step in e.steps)]
        return out or [(self._box(""), events)]

    def _trends_by_breakdown(self) -> list[dict[str, Any]]:
        """Funnel trends broken down: one series per breakdown value, in the order of the steps view
        (last step's count first), with Other and the null group last."""
        request = self.request
        buckets = self.range.buckets()
        index = {int(b.timestamp()): i for i, b in enumerate(buckets)}
        shown = [value for value, _ in self.groups()]
        other = next((v for v in shown if v and v[0] == OTHER and len(set(v)) == 1), None)
        per_value: dict[tuple[str, ...], tuple[list[set[str]], list[set[str]]]] = {
            value: ([set() for _ in buckets], [set() for _ in buckets]) for value in shown}
        for person, events in self.actors().items():
            for value, subset in self._attributed_events(person, events):
                series = per_value.get(value) or (per_value.get(other) if other is not None else None)
                if series is None:
                    continue
                attempts = ordered_attempts(subset, self.steps, request.window_s, request.order)
                for start, reached in attempts or []:
                    i = index.get(int(start_of_interval(datetime.fromtimestamp(start, self.tz), self.interval,
                                                        self.project.week_start_day).timestamp()))
                    if i is None:
                        continue
                    if reached >= request.from_step + 1:
                        series[0][i].add(person)
                    if reached >= request.to_step + 1:
                        series[1][i].add(person)
        out = []
        for value in shown:
            entered, converted = per_value[value]
            boxed: Any = list(value)
            if request.unbox and len(boxed) == 1:
                boxed = boxed[0]
            out.append({**self._trend_object(buckets, [len(s) for s in entered], [len(s) for s in converted]),
                        "breakdown_value": boxed})
        return out

    def _trend_object(self, buckets: list[datetime], from_counts: list[int], to_counts: list[int]
                      ) -> dict[str, Any]:
        rates = [round(100 * t / f, 2) if f else 0 for f, t in zip(from_counts, to_counts, strict=True)]
        return {
            "count": len(buckets), "data": rates, "days": [day_string(b, self.interval) for b in buckets],
            "labels": [bucket_label(b, self.interval, self.range) if self.interval != "day"
                       else f"{b.day}-{b.strftime('%b-%Y')}" for b in buckets],
            "reached_from_step_count": from_counts, "reached_to_step_count": to_counts,
            "filter": self.request.raw, "action": None,
        }

    def _trends(self) -> list[dict[str, Any]]:
        """Conversion rate per entrance period (§7.10, §19.12)."""
        request = self.request
        if request.definition.breakdown is not None:
            return self._trends_by_breakdown()
        buckets = self.range.buckets()
        index = {int(b.timestamp()): i for i, b in enumerate(buckets)}
        entered: list[set[str]] = [set() for _ in buckets]
        converted: list[set[str]] = [set() for _ in buckets]
        from_counts = to_counts = [0] * len(buckets)
        actors = self.actors() if not self.summarised else None
        if actors is None:
            rows, actors = self._attempts()
            window, low, high = self._bounds_ms
            bounds = np.array([int(b.timestamp() * 1000) for b in buckets], dtype=np.int64)
            from_counts, to_counts = entrances(rows[:, 0], rows[:, 1:], window, low, high, bounds,
                                               request.from_step, request.to_step)
        for person, events in actors.items():
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
        from_counts = [n + len(s) for n, s in zip(from_counts, entered, strict=True)]
        to_counts = [n + len(s) for n, s in zip(to_counts, converted, strict=True)]
        return [self._trend_object(buckets, from_counts, to_counts)]



CORRELATION_TYPES = ("events", "properties", "event_with_properties")


@dataclass(frozen=True)
class CorrelationRequest:
    kind: str
    names: tuple[str, ...]              # properties to analyse ("$all" = every one)
    exclude_names: tuple[str, ...]
    event_names: tuple[str, ...]        # event_with_properties: events whose properties are analysed
    exclude_event_names: tuple[str, ...]
    exclude_property_names: tuple[str, ...]


def parse_correlation(data: dict[str, Any]) -> CorrelationRequest:
    kind = str(data.get("funnel_correlation_type") or "events")
    if kind not in CORRELATION_TYPES:
        raise RequestError(f"Unknown funnel_correlation_type '{kind}'.", "funnel_correlation_type", "invalid_choice")

    def names(field: str) -> tuple[str, ...]:
        value = decode_json_field(data, field, [])
        if not isinstance(value, list):
            raise RequestError(f"'{field}' must be a list of names", field)
        return tuple(str(v) for v in value)

    request = CorrelationRequest(kind, names("funnel_correlation_names"), names("funnel_correlation_exclude_names"),
                                 names("funnel_correlation_event_names"),
                                 names("funnel_correlation_exclude_event_names"),
                                 names("funnel_correlation_event_exclude_property_names"))
    if kind == "properties" and not request.names:
        raise RequestError("Property Correlation expects atleast one Property to run correlation on")
    if kind == "event_with_properties" and not request.event_names:
        raise RequestError("Event Property Correlation expects atleast one event name to run correlation on")
    return request


def _event_columns(raws: list[bytes], merged: dict[int, int], low: float, high: float) -> CorrelationEvents | None:
    """A funnel's kept day rows (`person|ts|uuid|value`, state/records.py) as columns, merged
    persons as the person they became, only those in [low, high] ms; None if one hit an exclusion."""
    persons, stamps, uuids, payloads = read_day_rows(raws)
    values = flat(pc.dictionary_encode(payloads))
    return correlation_columns(persons, stamps, uuids, values.indices.to_numpy(zero_copy_only=False).astype(np.int64),
                               values.dictionary.to_pylist(), merged, low, high)


def _counted_by_person(query: FunnelQuery, request: CorrelationRequest, person_properties: Any, step_names: set[Any]
                       ) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(converted persons, the others, {candidate: (converted, others) persons with it}), running the
    funnel UDF over each person's events."""
    funnel_request = query.request
    window, date_to = funnel_request.window_s, query.range.date_to.timestamp()
    success: set[str] = set()
    failure: set[str] = set()
    seen: dict[str, dict[str, bool]] = defaultdict(dict)  # candidate -> person -> converted
    for person, events in query.actors().items():
        result = funnel(events, query.steps, window, funnel_request.order)
        if result is None or not result.steps_reached:
            continue
        converted = result.steps_reached == query.steps
        (success if converted else failure).add(person)
        first = result.timestamps[0]
        last = result.timestamps[-1] if converted else min(first + window, date_to)
        if request.kind == "properties":
            continue
        for event in events:
            if not (first < event.ts < last) or not event.name or event.name in step_names:
                continue
            if request.kind == "events":
                if event.name not in request.exclude_event_names:
                    seen[event.name][person] = converted
            elif event.name in request.event_names and event.properties:
                for prop, value in event.properties.items():
                    if prop not in request.exclude_property_names and not prop.startswith("$set"):
                        seen[f"{event.name}::{prop}::{as_text(value)}"][person] = converted
    if request.kind == "properties":
        props = person_properties(sorted(success | failure))
        for person, values in props.items():
            for prop, value in values.items():
                wanted = "$all" in request.names or prop in request.names
                if wanted and prop not in request.exclude_names:
                    seen[f"{prop}::{as_text(value)}"][person] = person in success
    counts = {key: (sum(people.values()), len(people) - sum(people.values())) for key, people in seen.items()}
    return len(success), len(failure), counts


def correlation(query: FunnelQuery, request: CorrelationRequest, person_properties: Any,
                columns: CorrelationEvents | None = None) -> dict[str, Any]:
    """Which events or properties go with converting (§8.3): +1-smoothed odds ratios, top 10 each side.
    `columns`: the funnel's kept events read already (from the archive)."""
    funnel_request = query.request
    step_names = {e.id for e in funnel_request.entities if e.id is not None}
    window = funnel_request.window_s
    date_to = query.range.date_to.timestamp()
    if columns is None and request.kind == "events":
        columns = query.correlation_events()
    if columns is not None:
        ignored = {n for n in step_names if isinstance(n, str)} | set(request.exclude_event_names)
        _, lo_ms, hi_ms = query._bounds_ms
        counted = event_correlation(columns, query.steps, window, lo_ms, hi_ms, date_to, ignored)
        big_s, big_f, counts = counted.success, counted.failure, counted.by_name
    else:
        big_s, big_f, counts = _counted_by_person(query, request, person_properties, step_names)
    if not big_s or not big_f:
        return {"events": [], "skewed": True}
    events = [{"event": {"event": key, "properties": {}, "elements": []}, "success_count": s, "failure_count": f,
               "odds_ratio": odds, "correlation_type": "success" if odds > 1 else "failure"}
              for key, s, f, odds in correlation_rows(big_s, big_f, counts, request.kind)]
    return {"events": events, "skewed": big_s / big_f > 10 or big_f / big_s > 10}


def correlation_rows(big_s: int, big_f: int, counts: dict[str, tuple[int, int]], kind: str = "events"
                     ) -> list[tuple[str, int, int, float]]:
    """§8.3 steps 6-9 over counted candidates (`big_s`, `big_f`: converted and other actors, both
    non-zero): (candidate, converted, others, odds ratio) of the rows returned, successes first."""
    rows = []
    for key, (s, f) in counts.items():
        if s + f < min(25, 0.02 * (big_s + big_f)):
            continue
        if kind == "event_with_properties" and s + f <= 2:
            continue
        odds = ((s + 1) / (big_s - s + 1)) / ((f + 1) / (big_f - f + 1))
        rows.append((key, s, f, odds))
    positive = sorted((r for r in rows if r[3] > 1), key=lambda r: (-r[3], r[0]))[:10]
    negative = sorted((r for r in rows if r[3] <= 1), key=lambda r: (r[3], r[0]))[:10]
    return positive + negative



class CorrelationQuery(Computation):
    """Funnel correlation as a query like the others: the funnel's definitions, then `correlation`.

    Event correlation of an ordered funnel that reads only the event (no exclusions, first-time
    steps or person properties) is answered from the event archive's columns when the archive holds
    every event state counted: nothing is registered, so there is no definition keeping every event
    of the project in Redis to build first, and no million rows read back from Redis per query. The
    funnel's kept values come from its own `contribution` over the archived columns, as a backfill
    computes them (dataflows/operators/history.py), and the archive holds the copy state counted,
    with the person it counted it for, so the numbers are those of the registered path."""

    def __init__(self, funnel_query: FunnelQuery, wanted: CorrelationRequest, archive: Archive | None = None) -> None:
        self.funnel, self.wanted, self.request = funnel_query, wanted, funnel_query.request
        self.redis, self.project = funnel_query.redis, funnel_query.project
        self._candidate = archive if archive is not None and self._by_columns() else None
        self.archive: Archive | None = None  # the archive answers: `prepare` found it complete

    def _by_columns(self) -> bool:
        request, definition = self.request, self.request.definition
        return (self.wanted.kind == "events" and request.order == "ordered" and not definition.exclusions
                and not request.first_time_steps and definition.columnar)

    def prepare(self) -> None:
        if self._candidate is not None and self.archive is None and archive_complete(
                self._candidate, self.state, self.project.id):
            self.archive = self._candidate

    def definitions(self) -> list[Any]:
        return [] if self.archive is not None else self.funnel.definitions()

    def run(self) -> dict[str, Any]:
        funnel = self.funnel

        def person_properties(persons: list[str]) -> dict[str, dict[str, Any]]:
            return {str(p["id"]): p["properties"] for p in person_details(funnel.redis, funnel.project.id, persons)}

        columns = funnel.archived_events(self.archive) if self.archive is not None else None
        return correlation(funnel, self.wanted, person_properties, columns)
