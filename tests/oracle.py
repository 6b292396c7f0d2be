"""From-scratch batch computations over the events a test sent: what incremental state must equal."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
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
