"""Kept sessions, trimmed to a range and re-split without excluded items, give exactly the sessions
(of two or more events) of the in-range, non-excluded events: what the paths query relies on."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.operators.path_sessions import SESSION_GAP_MS, column_sessions, kept_sessions, sessions

MINUTE = 60_000
event = st.tuples(st.integers(0, 600), st.integers(0, 999), st.sampled_from("abcde"))


def _multi(found: list[list[tuple[int, str, str]]]) -> list[list[tuple[int, str, str]]]:
    return sorted(s for s in found if len(s) > 1)


@settings(max_examples=500, deadline=None)
@given(stream=st.lists(event, max_size=60), lo=st.integers(0, 600), span=st.integers(0, 600),
       excluded=st.sets(st.sampled_from("abcde"), max_size=2))
def test_kept_sessions_cover_every_query(stream: list, lo: int, span: int, excluded: set[str]) -> None:
    events = [(minute * MINUTE, f"{minute:04d}-{tag:03d}-{n}", item) for n, (minute, tag, item) in enumerate(stream)]
    low, high = lo * MINUTE, (lo + span) * MINUTE

    def wanted(e: tuple[int, str, str]) -> bool:
        return low <= e[0] <= high and e[2] not in excluded

    direct = _multi(sessions(e for e in events if wanted(e)))
    from_kept = _multi([s for kept in kept_sessions(events) for s in sessions(e for e in kept if wanted(e))])
    assert from_kept == direct


def test_gap_of_exactly_thirty_minutes_splits() -> None:
    events = [(0, "a", "x"), (SESSION_GAP_MS - 1, "b", "y"), (2 * SESSION_GAP_MS - 1, "c", "z")]
    assert [len(s) for s in sessions(events)] == [2, 1]


@settings(max_examples=300, deadline=None)
@given(stream=st.lists(st.tuples(st.integers(1, 4), event, st.booleans()), max_size=80), lo=st.integers(0, 600),
       span=st.integers(0, 600))
def test_sessions_from_columns_are_the_kept_sessions_trimmed(stream: list, lo: int, span: int) -> None:
    """Several persons' events as columns, in any order, some not path events (no item): the
    sessions `column_sessions` cuts inside a range are each person's kept sessions trimmed to it."""
    rows = [(person, minute * MINUTE, f"{minute:04d}-{tag:03d}-{n}", item if path else None)
            for n, (person, (minute, tag, item), path) in enumerate(stream)]
    low, high = lo * MINUTE, (lo + span) * MINUTE
    items = sorted({r[3] for r in rows if r[3] is not None})
    codes = np.array([items.index(r[3]) if r[3] is not None else len(items) + n % 2 for n, r in enumerate(rows)],
                     dtype=np.int64)  # no item: a code past the items, or one whose item is None
    found = column_sessions(np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows],
                            dtype=np.int64), pa.array([r[2] for r in rows], pa.string()), codes, [*items, None],
                            low, high)
    expected = []
    for person in sorted({r[0] for r in rows}):
        mine = [(t, u, i) for p, t, u, i in rows if p == person and i is not None]
        for kept in kept_sessions(mine):
            inside = [e for e in kept if low <= e[0] <= high]
            if len(inside) > 1:
                expected.append(inside)
    assert sorted(found) == sorted(expected)
    assert all(session == sorted(session) for session in found)
