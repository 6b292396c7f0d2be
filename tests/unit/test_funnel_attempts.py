"""Per-attempt rows evaluated for a window and range equal PostHog's funnel UDF run over the events."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.operators.funnel_attempts import (
    PersonEvent,
    attempt_chains,
    best_attempts,
    entrances,
    outcomes,
    regular,
)
from dataflows.operators.funnels import StepEvent, funnel, ordered_attempts

STEPS = 3

# (person, second, steps mask, uuid tag): seconds collide now and then, as same-instant events do
event = st.tuples(st.integers(0, 3), st.integers(0, 2400), st.integers(1, 7), st.integers(0, 20))


def _rows(stream: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray, dict[int, list[StepEvent]]]:
    per_person: dict[int, list[tuple[int, str, int]]] = defaultdict(list)
    for n, (person, second, mask, tag) in enumerate(stream):
        per_person[person].append((second * 1000, f"u{tag:02d}-{n:03d}", mask << 1))
    persons, rows, direct = [], [], {}
    for person, evs in per_person.items():
        if not regular([PersonEvent(*e) for e in evs]):
            continue  # evaluated by the UDF over its events (the summariser keeps no rows for it)
        for row in attempt_chains([PersonEvent(*e) for e in evs], STEPS):
            persons.append(person)
            rows.append(row)
        direct[person] = [StepEvent(ts / 1000, u, tuple(k for k in range(1, STEPS + 1) if m >> k & 1))
                          for ts, u, m in evs]
    return np.array(persons, dtype=np.int64), np.array(rows, dtype=np.int64).reshape(-1, STEPS), direct


@settings(max_examples=1500, deadline=None)
@given(stream=st.lists(event, max_size=40), window=st.integers(1, 30), lo=st.integers(0, 20),
       span=st.integers(0, 40))
def test_rows_answer_like_the_udf(stream: list, window: int, lo: int, span: int) -> None:
    persons, rows, direct = _rows(stream)
    lo_ms, hi_ms, window_ms = lo * 60_000, (lo + span) * 60_000, window * 60_000
    who, reached, best = best_attempts(persons, rows, window_ms, lo_ms, hi_ms)
    got = outcomes(who, reached, best)
    answer = {int(p): (int(r), tuple(t[:r])) for p, r, t in zip(got.persons, got.reached, got.times, strict=True)}
    expected = {}
    for person, evs in direct.items():
        inside = [e for e in evs if lo_ms / 1000 <= e.ts <= hi_ms / 1000]
        result = funnel(inside, STEPS, window_ms / 1000, "ordered")
        if result is not None and result.steps_reached:
            expected[person] = (result.steps_reached, result.timestamps)
    assert answer == expected


@settings(max_examples=1000, deadline=None)
@given(stream=st.lists(event, max_size=40), window=st.integers(1, 30), lo=st.integers(0, 20),
       span=st.integers(0, 40), period=st.integers(1, 10))
def test_entrances_like_the_udf_attempts(stream: list, window: int, lo: int, span: int, period: int) -> None:
    persons, rows, direct = _rows(stream)
    lo_ms, hi_ms, window_ms = lo * 60_000, (lo + span) * 60_000, window * 60_000
    bounds = np.arange(lo_ms, hi_ms + 1, period * 60_000, dtype=np.int64)
    got = entrances(persons, rows, window_ms, lo_ms, hi_ms, bounds, 0, STEPS - 1)
    entered, converted = [set() for _ in bounds], [set() for _ in bounds]
    for person, evs in direct.items():
        inside = [e for e in evs if lo_ms / 1000 <= e.ts <= hi_ms / 1000]
        for start, reached in ordered_attempts(inside, STEPS, window_ms / 1000, "ordered") or []:
            i = int((start * 1000 - lo_ms) // (period * 60_000))
            entered[i].add(person)
            if reached >= STEPS:
                converted[i].add(person)
    assert got == ([len(s) for s in entered], [len(s) for s in converted])
