"""Path edges (spec §9.3, §19.15-17) from the sessions a paths definition keeps per person.

A query reads the sessions touching the days of its range (state/summaries.py, cached per day
version), trims each to the range, and re-applies cleaning, grouping and exclusions inside it
(which can only cut a session further), then collapses repeats, shapes and counts edges.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

import redis

from dataflows.operators.path_sessions import sessions
from dataflows.operators.summaries import summarise_groups
from schemas.dates import QueryDateRange, day_keys, zone
from schemas.paths import PathDefinition, PathsRequest
from schemas.projects import Project
from schemas.trends import RequestError
from serving.compute import Computation
from state.records import read_person_events, read_sessions
from state.summaries import SUMMARIES, SummaryStore

ELLIPSIS = "..."


class PathsQuery(Computation):
    def __init__(self, client: redis.Redis, project: Project, request: PathsRequest, now: datetime) -> None:
        self.redis, self.project, self.request = client, project, request
        self.tz = zone(project.timezone)
        try:
            self.range = QueryDateRange.resolve(date_from=request.date_from, date_to=request.date_to, interval="day",
                                                tz=self.tz, now=now, week_start=project.week_start_day)
        except ValueError as exc:
            raise RequestError(str(exc), "date_from") from exc
        self._items: dict[str, str | None] = {}

    def definitions(self) -> list[PathDefinition]:
        return [self.request.definition]

    def _raw_sessions(self) -> list[list[tuple[int, str, str]]]:
        """The kept sessions touching the range, each trimmed to it: (ms, uuid, raw item). Persons
        whose kept events changed since they were summarised (or merged since, not marked yet) have
        their sessions computed here from their whole group's events (a query writes nothing),
        replacing what is stored for them."""
        definition = self.request.definition
        days = day_keys(self.range.date_from, self.range.date_to)
        low, high = self.range.date_from.timestamp() * 1000, self.range.date_to.timestamp() * 1000
        store = SummaryStore(self.redis)
        dirty = store.dirty(self.project.id, definition.hash)
        groups = store.group_kept(self.project.id, definition.hash, dirty, self.state.overrides)
        fresh = [plans[s] for s, plans in summarise_groups(definition, groups).items()]
        stale = {e.uuid for raws in groups.values() for raw in raws.values() for e in read_person_events(raw)[0]}
        wanted = set(days)
        recomputed = read_sessions([v for plan in fresh for kind, day, v in plan.entries if day in wanted and v])
        seen: set[str] = set(stale)  # a dirty person's stored sessions are replaced by `recomputed`
        out = []
        for found in [*SUMMARIES.read(self.redis, definition, days, read_sessions), recomputed]:
            if found is recomputed:
                seen -= stale
            for times, uuids, items in found:
                if uuids[0] in seen:  # a session spanning days is kept under each of them
                    continue
                seen.add(uuids[0])
                inside = [(t, u, i) for t, u, i in zip(times, uuids, items, strict=True) if low <= t <= high]
                if len(inside) > 1:
                    out.append(inside)
        return out

    def _item(self, raw: str) -> str | None:
        """The item after cleaning, grouping and exclusion (None: excluded); memoised per query."""
        if raw in self._items:
            return self._items[raw]
        item = raw
        for pattern, alias in self.request.cleaning:
            item = pattern.sub(alias, item)
        for name, pattern in self.request.groupings:
            if pattern.search(item):
                item = name
                break
        self._items[raw] = None if item in self.request.exclude else item
        return self._items[raw]

    def _sessions(self, events: list[tuple[int, str, str]]) -> list[list[tuple[str, int]]]:
        """The query's items (cleaned, grouped, exclusions dropped) cut into sessions by the one
        session rule, repeats collapsed (time of the run's last event)."""
        kept = [(ts, uuid, item) for ts, uuid, raw in events if (item := self._item(raw)) is not None]
        out = []
        for session in sessions(kept):
            collapsed: list[tuple[str, int]] = []
            for ts, _uuid, item in session:
                if collapsed and collapsed[-1][0] == item:
                    collapsed[-1] = (item, ts)
                else:
                    collapsed.append((item, ts))
            out.append(collapsed)
        return out

    def _shape(self, session: list[tuple[str, int]]) -> list[tuple[str, int]] | None:
        """Start/end points and the step limit (§9.3 step 7, §19.16)."""
        start, end, limit = self.request.start_point, self.request.end_point, self.request.step_limit
        items = [i for i, _ in session]
        if start is not None:
            if start not in items:
                return None
            session = session[items.index(start):]
            items = items[items.index(start):]
        if end is not None:
            if end not in items:
                return None
            session = session[: items.index(end) + 1]
            if start is None:
                return session[-limit:]
            if len(session) > limit:
                half = limit // 2
                return [*session[:half], (ELLIPSIS, session[half][1]), *session[len(session) - half:]]
            return session
        return session[:limit]

    def run(self) -> list[dict[str, Any]]:
        counts: dict[tuple[str, str], int] = defaultdict(int)
        times: dict[tuple[str, str], float] = defaultdict(float)
        for events in self._raw_sessions():
            for session in self._sessions(events):
                path = self._shape(session)
                if not path:
                    continue
                for i in range(len(path) - 1):
                    edge = (f"{i + 1}_{path[i][0]}", f"{i + 2}_{path[i + 1][0]}")
                    counts[edge] += 1
                    times[edge] += path[i + 1][1] - path[i][1]
        request = self.request
        edges = [(s, t, v, times[(s, t)] / v) for (s, t), v in counts.items()
                 if (request.min_weight is None or v >= request.min_weight)
                 and (request.max_weight is None or v <= request.max_weight)]
        edges.sort(key=lambda e: (-e[2], e[0], e[1]))
        edges = edges[: request.edge_limit]
        if request.min_weight is None and request.max_weight is None:
            edges = _reachable(edges)
        return [{"source": s, "target": t, "value": v, "average_conversion_time": avg} for s, t, v, avg in edges]


def _reachable(edges: list[tuple[str, str, int, float]]) -> list[tuple[str, str, int, float]]:
    """Drop edges whose source is neither a first step nor the target of a kept edge (§9.3 step 11)."""
    kept = edges
    while True:
        targets = {t for _, t, _, _ in kept}
        pruned = [e for e in kept if e[0].startswith("1_") or e[0] in targets]
        if len(pruned) == len(kept):
            return kept
        kept = pruned
