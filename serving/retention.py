"""Retention from person bitmaps (spec §10): each cell is a cohort bitmap AND a return bitmap.

Cohorts and returns per period are unions of the day (or hour) bitmaps the always-on state or a
trend definition keeps; first-time cohorts use the first-time bitmaps of the always-on state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from dateutil.relativedelta import relativedelta

from schemas.dates import iso_instant, relative_date_parse, start_of_interval, zone
from schemas.definitions import BREAKDOWN_OTHER, NO_BREAKDOWN, Definition
from schemas.projects import Project
from schemas.retention import RetentionRequest, entity_definition
from schemas.trends import Entity, RequestError
from serving.compute import Computation
from serving.trends import union as _union
from state import keys
from state.reads import Source

_STEP = {"Hour": relativedelta(hours=1), "Day": relativedelta(days=1), "Week": relativedelta(weeks=1),
         "Month": relativedelta(months=1)}


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime  # exclusive


class RetentionQuery(Computation):
    def __init__(self, client: redis.Redis, project: Project, request: RetentionRequest, now: datetime) -> None:
        self.redis, self.project, self.request = client, project, request
        self.tz = zone(project.timezone)
        anchor = now.astimezone(self.tz)
        if request.date_to:
            try:
                anchor, _ = relative_date_parse(request.date_to, self.tz, now)
            except ValueError as exc:
                raise RequestError(str(exc), "date_to") from exc
        self.periods = self._periods(anchor)
        pid, tz = project.id, project.timezone
        self.target_def = entity_definition(request, request.target, pid, tz)
        per_actor = request.minimum_occurrences > 1
        self.returning_def = entity_definition(request, request.returning, pid, tz, per_actor=per_actor)
        self._names: list[str] | None = None

    def _periods(self, anchor: datetime) -> list[Period]:
        """The range derived from date_to (§10.3, §19.10)."""
        request, step = self.request, _STEP[self.request.period]
        n = request.total_intervals
        if request.period == "Month":
            first = anchor.replace(day=1, hour=0, minute=0, second=0, microsecond=0) - relativedelta(months=n - 1)
            starts = [_local(first + relativedelta(months=i), self.tz) for i in range(n + 1)]
            return [Period(starts[i], starts[i + 1]) for i in range(n)]
        moved = anchor + step
        end = moved.replace(minute=0, second=0, microsecond=0) if request.period == "Hour" else \
            moved.replace(hour=0, minute=0, second=0, microsecond=0)
        start = end - step * n
        if request.period == "Week":
            start = start_of_interval(start, "week", self.project.week_start_day)
        starts = [_local(start + step * i, self.tz) for i in range(n + 1)]
        return [Period(starts[i], min(starts[i + 1], _local(end, self.tz))) for i in range(n)]

    def definitions(self) -> list[Definition]:
        return list({d.hash: d for d in (self.target_def, self.returning_def) if d is not None}.values())

    # --- which bitmaps make up a period ------------------------------------------------------------
    def _buckets(self, period: Period) -> list[str | int]:
        if self.request.period == "Hour":
            return [int(period.start.timestamp())]
        out, day = [], period.start
        while day < period.end:
            out.append(day.strftime("%Y%m%d"))
            day = _local(day + timedelta(days=1), self.tz)
        return out

    def _source(self, entity: Entity, definition: Definition | None) -> tuple[Source, list[str]]:
        if definition is not None:
            return Source.definition(self.project.id, definition.hash), [NO_BREAKDOWN]
        if entity.id is not None:
            return Source.always_on(self.project.id), [entity.id]
        if self._names is None:
            self._names = self.state.event_names(self.project.id)
        return Source.always_on(self.project.id), self._names

    def _keys(self, source: Source, names: list[str], period: Period) -> list[str]:
        return [source.persons(n, b) for n in names for b in self._buckets(period)]

    def _cohort_keys(self, names: list[str] | None = None) -> list[list[str]]:
        request = self.request
        if request.first_time:
            return [self._keys(Source.first_times(self.project.id), [str(request.target.id)], p) for p in self.periods]
        source, default = self._source(request.target, self.target_def)
        return [self._keys(source, names or default, p) for p in self.periods]

    def _returns(self, names: list[str] | None = None) -> list[int]:
        request = self.request
        source, default = self._source(request.returning, self.returning_def)
        chosen = names or default
        if request.minimum_occurrences > 1:
            return self._frequent_returns(source, chosen)
        lists = [self._keys(source, chosen, p) for p in self.periods]
        bitmaps = self.state.bitmaps(lists)
        return [_union(bitmaps, members) for members in lists]

    def _frequent_returns(self, source: Source, names: list[str]) -> list[int]:
        """Returns that count only in periods with at least `minimum_occurrences` returning events."""
        out = []
        for counts in self.state.events_per_person(source.prefix, names, [self._buckets(p) for p in self.periods]):
            bits = 0
            for person, count in counts.items():
                if count >= self.request.minimum_occurrences:
                    bits |= 1 << person
            out.append(bits)
        return out

    # --- the matrix ------------------------------------------------------------------------------
    def matrix(self, names: list[str] | None = None, return_names: list[str] | None = None
               ) -> tuple[list[list[int]], list[int]]:
        """Counts per cohort row (triangle) and the cohort bitmaps."""
        cohort_lists = self._cohort_keys(names)
        bitmaps = self.state.bitmaps(cohort_lists)
        cohorts = [_union(bitmaps, members) for members in cohort_lists]
        returns = self._returns(return_names)
        n = len(self.periods)
        if self.request.cumulative:
            later = [0] * (n + 1)
            for i in range(n - 1, -1, -1):
                later[i] = later[i + 1] | returns[i]
            returns = later[:n]
        rows = []
        for c in range(n):
            rows.append([cohorts[c].bit_count()] + [(cohorts[c] & returns[c + k]).bit_count() for k in range(1, n - c)])
        return rows, cohorts

    def run(self, people_url: Any = None) -> list[dict[str, Any]]:
        if self.request.breakdown is None:
            rows, _ = self.matrix()
            return self._rows(rows, people_url)
        assert self.target_def is not None and self.returning_def is not None
        values = self.state.breakdown_values(keys.definition_prefix(self.project.id, self.target_def.hash))
        matrices = {v: self.matrix([v], [v])[0] for v in values}
        ranked = sorted((v for v in values if any(r[0] for r in matrices[v])),
                        key=lambda v: (-sum(r[0] for r in matrices[v]), v))
        kept, rest = ranked[: self.request.breakdown_limit], ranked[self.request.breakdown_limit:]
        out = []
        for value in kept:
            out += self._rows(matrices[value], people_url, value)
        if rest:
            other, _ = self._other(rest)
            out += self._rows(other, people_url, BREAKDOWN_OTHER)
        return out

    def _other(self, values: list[str]) -> tuple[list[list[int]], list[int]]:
        """The folded values' matrix: the cell-wise sum of theirs (§19.2)."""
        total: list[list[int]] | None = None
        for value in values:
            rows, _ = self.matrix([value], [value])
            total = rows if total is None else [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(total, rows,
                                                                                                          strict=True)]
        return total or [], []

    def _rows(self, rows: list[list[int]], people_url: Any, value: str | None = None) -> list[dict[str, Any]]:
        out = []
        for i, row in enumerate(rows):
            item: dict[str, Any] = {
                "values": [{"count": count, "people": [], **({"people_url": people_url(i, k, value, True)}
                                                            if people_url and count else {})}
                           for k, count in enumerate(row)],
                "label": f"{self.request.period} {i}",
                "date": iso_instant(self.periods[i].start),
            }
            if people_url:
                item["people_url"] = people_url(i, None, value, False)
            if value is not None:
                item["breakdown_value"] = value
            out.append(item)
        return out

    def people(self, selected: int, value: str | None) -> list[tuple[str, list[bool]]]:
        """Persons of one cohort row and, per later period, whether they returned."""
        names = [value] if value is not None else None
        _, cohorts = self.matrix(names, names)
        returns = self._returns(names)
        n = len(self.periods)
        cohort = cohorts[selected]
        out = []
        person = 0
        while cohort >> person:
            if cohort >> person & 1:
                out.append((str(person), [bool(returns[selected + k] >> person & 1) if k else True
                                          for k in range(n - selected)]))
            person += 1
        return out


def _local(moment: datetime, tz: Any) -> datetime:
    return moment.replace(tzinfo=None).replace(tzinfo=tz)

