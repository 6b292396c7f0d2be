"""A person's path events cut into sessions (spec §9.3 step 5), the unit paths state is kept in.

Sessions split wherever consecutive path events are 30 minutes or more apart. Query-time choices
only ever cut these further: dropping excluded items or events outside the range widens gaps, never
narrows them. So the summariser keeps, per person, the sessions of two or more events (a single
event never makes an edge), and a query re-applies cleaning, grouping, exclusions and the range
inside each one. Pure: the summariser writes the sessions, the query reads them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

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


def column_sessions(persons: np.ndarray, stamps: np.ndarray, uuids: pa.Array, codes: np.ndarray,
                    items: list[str | None], low: float, high: float, gap_ms: int = SESSION_GAP_MS
                    ) -> list[list[PathEvent]]:
    """Every person's sessions of two or more events inside [low, high] ms, from path events as
    columns (row i's raw item `items[codes[i]]`; None, or a code past `items`: not a path event).
    This is what the kept sessions give once a query trims them to the range: a person's events
    inside a range are a run of all its events in time order, so its sessions there are cut at the
    same gaps."""
    has = np.array([item is not None for item in items] + [False], dtype=bool)
    rows = np.flatnonzero((stamps >= low) & (stamps <= high) & has[np.minimum(codes, len(items))])
    if not len(rows):
        return []
    order = np.lexsort((stamps[rows], persons[rows]))
    rows = rows[order]
    p, t = persons[rows], stamps[rows]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (p[1:] != p[:-1]) | (t[1:] - t[:-1] >= gap_ms)
    first = np.flatnonzero(new)
    sizes = np.diff(np.append(first, len(rows)))
    chosen = rows[np.repeat(sizes > 1, sizes)]  # the rows of sessions of two or more, in order
    if not len(chosen):
        return []
    times = stamps[chosen].tolist()
    ids = uuids.take(pa.array(chosen)).to_pylist()
    raw = [items[c] for c in codes[chosen].tolist()]
    out: list[list[PathEvent]] = []
    at = 0
    for size in sizes[sizes > 1].tolist():
        # sorted: events at one instant in uuid order, as `sessions` orders them
        out.append(sorted(zip(times[at:at + size], ids[at:at + size], raw[at:at + size], strict=True)))
        at += size
    return out
