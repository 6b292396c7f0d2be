"""Kept sessions, trimmed to a range and re-split without excluded items, give exactly the sessions
(of two or more events) of the in-range, non-excluded events: what the paths query relies on."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.operators.path_sessions import SESSION_GAP_MS, kept_sessions, sessions

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
