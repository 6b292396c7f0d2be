"""From-scratch batch computations over the events a test sent: what incremental state must equal."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any


def trend_by_breakdown(events: Iterable[dict[str, Any]], event: str, days: list[str],
                       keep: Callable[[dict[str, Any]], bool], breakdown: str
                       ) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(events per day, distinct persons per day) for each breakdown value; distinct_id is the person."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    persons: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for e in events:
        if e["event"] != event or not keep(e):
            continue
        day = e["timestamp"][:10]
        value = e["properties"].get(breakdown)
        bv = "$$_posthog_breakdown_null_$$" if value in (None, "") else str(value)
        counts[bv][day] += 1
        persons[bv][day].add(e["distinct_id"])
    totals = {bv: [by_day.get(d, 0) for d in days] for bv, by_day in counts.items()}
    uniques = {bv: [len(by_day.get(d, ())) for d in days] for bv, by_day in persons.items()}
    return totals, uniques


def default_paths(events: Iterable[dict[str, Any]], person: Callable[[dict[str, Any]], str], steps: int = 5
                  ) -> dict[tuple[str, str], int]:
    """Edges of default $pageview paths: each person's events (ties broken by uuid) cut into
    30-minute sessions, repeats collapsed, first `steps` items."""
    visits: dict[str, list[tuple[datetime, str, str]]] = defaultdict(list)
    for e in events:
        if e["event"] == "$pageview":
            moment = datetime.fromisoformat(e["timestamp"])
            visits[person(e)].append((moment, e["uuid"], e["properties"]["$current_url"]))
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for found in visits.values():
        sessions: list[list[str]] = []
        last = None
        for moment, _uuid, url in sorted(found):
            if last is None or (moment - last).total_seconds() >= 1800:
                sessions.append([])
            last = moment
            if not sessions[-1] or sessions[-1][-1] != url:
                sessions[-1].append(url)
        for items in sessions:
            items = items[:steps]
            for i in range(len(items) - 1):
                edges[(f"{i + 1}_{items[i]}", f"{i + 2}_{items[i + 1]}")] += 1
    return dict(edges)
