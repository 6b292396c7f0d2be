"""Event correlation over columns equals the per-person path it replaces for ordered funnels
(dataflows/operators/funnel_correlation.py against serving/funnels.py `_counted_by_person`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.operators.funnel_correlation import CorrelationEvents, column_outcomes, event_correlation
from dataflows.operators.funnels import StepEvent, funnel, step_bits
from serving.funnels import CorrelationRequest, _counted_by_person

pytestmark = pytest.mark.unit
BASE = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1000)
NAMES = ["s1", "s2", "s3", "a", "b", ""]


@dataclass
class _Request:
    window_s: float
    order: str = "ordered"


@dataclass
class _Range:
    date_to: datetime


@dataclass
class _Query:
    """What `_counted_by_person` reads of a funnel query: its request, steps, range and actors."""

    request: _Request
    steps: int
    range: _Range
    events: dict[str, list[StepEvent]]

    def actors(self) -> dict[str, list[StepEvent]]:
        return self.events


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 100_000), steps=st.integers(1, 3), window_h=st.sampled_from([1, 24, 24 * 14]))
def test_event_correlation_equals_the_per_person_path(seed: int, steps: int, window_h: int) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(rng.randrange(0, 250)):
        ts = BASE + rng.choice([rng.randrange(6 * 86_400_000), rng.randrange(30) * 1_800_000, 1000 * rng.randrange(4)])
        name = rng.choice(NAMES)
        mask = sum(1 << k for k in range(1, steps + 1) if name == f"s{k}" or rng.random() < 0.05)
        rows.append((rng.randrange(1, 15), ts, f"{rng.randrange(1 << 30):08x}{i}", mask, name))
    lo_ms = BASE + rng.randrange(2 * 86_400_000)
    hi_ms = lo_ms + rng.randrange(1, 5 * 86_400_000)
    date_to = datetime.fromtimestamp((hi_ms + 0.999) / 1000, UTC)
    inside = [r for r in rows if lo_ms <= r[1] <= hi_ms]
    names = sorted({r[4] for r in inside})
    columns = CorrelationEvents(np.array([r[0] for r in inside], dtype=np.int64),
                                np.array([r[1] for r in inside], dtype=np.int64), pa.array([r[2] for r in inside],
                                                                                           pa.string()),
                                np.array([r[3] for r in inside], dtype=np.int64),
                                np.array([names.index(r[4]) for r in inside], dtype=np.int64), names)
    excluded = ("b",) if rng.random() < 0.5 else ()
    step_names = {f"s{k}" for k in range(1, steps + 1)}
    window_s = window_h * 3600.0
    found = event_correlation(columns, steps, window_s, lo_ms, hi_ms, date_to.timestamp(), step_names | set(excluded))
    actors: dict[str, list[StepEvent]] = {}
    for person, ts, uuid, mask, name in inside:
        actors.setdefault(str(person), []).append(StepEvent(ts / 1000, uuid, step_bits(mask), name=name))
    query: Any = _Query(_Request(window_s), steps, _Range(date_to), actors)
    request = CorrelationRequest("events", (), (), (), excluded, ())
    success, failure, counts = _counted_by_person(query, request, None, step_names)
    assert (found.success, found.failure, found.by_name) == (success, failure, counts)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 100_000), steps=st.integers(1, 4), window_h=st.sampled_from([1, 24, 24 * 14]))
def test_column_outcomes_are_the_udfs_attempts(seed: int, steps: int, window_h: int) -> None:
    """Each person's counted attempt over columns (what a funnel answered from the archive counts)
    is the one the funnel UDF finds in that person's events: steps reached and their times."""
    rng = random.Random(seed)
    rows = []
    for i in range(rng.randrange(0, 250)):
        ts = BASE + rng.choice([rng.randrange(6 * 86_400_000), rng.randrange(30) * 1_800_000, 1000 * rng.randrange(4)])
        mask = sum(1 << k for k in range(1, steps + 1) if rng.random() < 0.35)
        rows.append((rng.randrange(1, 15), ts, f"{rng.randrange(1 << 30):08x}{i}", mask))
    lo_ms = BASE + rng.randrange(2 * 86_400_000)
    hi_ms = lo_ms + rng.randrange(1, 5 * 86_400_000)
    inside = [r for r in rows if lo_ms <= r[1] <= hi_ms and r[3]]
    columns = CorrelationEvents(np.array([r[0] for r in inside], dtype=np.int64),
                                np.array([r[1] for r in inside], dtype=np.int64),
                                pa.array([r[2] for r in inside], pa.string()),
                                np.array([r[3] for r in inside], dtype=np.int64),
                                np.zeros(len(inside), dtype=np.int64), [""])
    window_s = window_h * 3600.0
    found = column_outcomes(columns, steps, window_s, lo_ms, hi_ms)
    got = {int(p): (int(r), [t for t in times.tolist() if t == t])
           for p, r, times in zip(found.persons, found.reached, found.times, strict=True)}
    expected = {}
    for person in {r[0] for r in inside}:
        events = [StepEvent(ts / 1000, uuid, step_bits(mask)) for p, ts, uuid, mask in inside if p == person]
        result = funnel(events, steps, window_s, "ordered")
        if result is not None and result.steps_reached:
            expected[person] = (result.steps_reached, list(result.timestamps))
    assert got == expected
