"""A person's path events cut into sessions (spec §9.3 step 5), the unit paths state is kept in.

Sessions split wherever consecutive path events are 30 minutes or more apart. Query-time choices
only ever cut these further: dropping excluded items or events outside the range widens gaps, never
narrows them. So the summariser keeps, per person, the sessions of two or more events (a single
event never makes an edge), and a query re-applies cleaning, grouping, exclusions and the range
inside each one. Pure: the summariser writes the sessions, the query reads them.
"""

from __future__ import annotations

from collections.abc import Iterable

SESSION_GAP_MS = 30 * 60 * 1000

PathEvent = tuple[int, str, str]  # (ms, uuid, raw item); tuples sort as PostHog orders events


def sessions(events: Iterable[PathEvent], gap_ms: int = SESSION_GAP_MS) -> list[list[PathEvent]]:
    """The person's sessions in time order (events ordered by time, then uuid)."""
    out: list[list[PathEvent]] = []
    last: int | None = None
    for event in sorted(events):
        if last is None or event[0] - last >= gap_ms:
            out.append([])
        out[-1].append(event)
        last = event[0]
    return out


def kept_sessions(events: Iterable[PathEvent]) -> list[list[PathEvent]]:
    """The sessions that can make an edge under some query: two or more events."""
    return [s for s in sessions(events) if len(s) > 1]
