"""Path edges (spec §9.3, §19.15-17) from the sessions a paths definition keeps per person.

A query reads the sessions touching the days of its range (state/summaries.py, cached per day
version), trims each to the range, and re-applies cleaning, grouping and exclusions inside it
(which can only cut a session further), then collapses repeats, shapes and counts edges.

The first ask of new paths that read only the event is answered from the event archive's columns
while the definition builds (as a new ordered funnel is, serving/funnels.py): the same sessions cut
from the same events, so the same edges.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis

from dataflows.operators.history import kept_values
from dataflows.operators.history_summaries import flat
from dataflows.operators.path_sessions import PathEvent, column_sessions, sessions
from dataflows.operators.persons import as_survivors
from dataflows.operators.summaries import summarise_groups
from schemas.dates import QueryDateRange, day_keys, zone
from schemas.paths import PathDefinition, PathsRequest
from schemas.projects import Project
from schemas.settings import Settings
from schemas.trends import RequestError
from serving.compute import AnsweredFromArchive, Computation
from state.archive import HOT_PROPERTIES, Archive
from state.records import read_person_events, read_sessions
from state.summaries import SUMMARIES, SummaryStore

ELLIPSIS = "..."


class PathsQuery(AnsweredFromArchive, Computation):
    def __init__(self, client: redis.Redis, project: Project, request: PathsRequest, now: datetime,
                 archive: Archive | None = None,
                 backlog_persons: int = Settings.archive_backlog_persons) -> None:
        self.redis, self.project, self.request = client, project, request
        self._candidate = archive if request.definition.columnar else None
        self._backlog_persons = backlog_persons
        self.tz = zone(project.timezone)
        try:
            self.range = QueryDateRange.resolve(date_from=request.date_from, date_to=request.date_to, interval="day",
                                                tz=self.tz, now=now, week_start=project.week_start_day)
        except ValueError as exc:
            raise RequestError(str(exc), "date_from") from exc
        self._items: dict[str, str | None] = {}

    def definitions(self) -> list[PathDefinition]:
        return [self.request.definition]

    def _archived_sessions(self, archive: Archive) -> list[list[PathEvent]]:
        """The sessions inside the range from the archive's columns: the definition's own
        `contribution` evaluated once per distinct input, merged persons as the person they became."""
        definition = self.request.definition
        day = timedelta(days=1)  # a day more each side: the project's zone may have moved since
        table = archive.definition_rows(self.project.id, definition.event_names(), definition.event_keys(),
                                        ["person", "event", "timestamp", "uuid"],
                                        (self.range.date_from.date() - day, self.range.date_to.date() + day))
        table, codes, values = kept_values(definition, table, datetime.now(UTC), set(HOT_PROPERTIES))
        if not table.num_rows:
            return []
        items = [None if v is None else orjson.loads(v)[0] for v in values]
        persons = as_survivors(table.column("person").to_numpy(), self.state.overrides.final)
        low, high = self.range.date_from.timestamp() * 1000, self.range.date_to.timestamp() * 1000
        return column_sessions(persons, table.column("timestamp").to_numpy(), flat(table.column("uuid")), codes,
                               items, low, high)

    def _raw_sessions(self) -> list[list[tuple[int, str, str]]]:
        """The kept sessions touching the range, each trimmed to it: (ms, uuid, raw item). Persons
        whose kept events changed since they were summarised (or merged since, not marked yet) have
        their sessions computed here from their whole group's events (a query writes nothing),
        replacing what is stored for them."""
        archive = self.answering_archive()
        if archive is not None:
            return self._archived_sessions(archive)
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
