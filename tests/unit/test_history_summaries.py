"""Summaries computed over a backfill's columns equal the per-person summariser's, byte for byte
(dataflows/operators/history_summaries.py against dataflows/operators/summaries.py)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.operators.history_summaries import (
    KeptColumns,
    attempt_summaries,
    by_columns,
    group_summaries,
    kept_summaries,
    session_summaries,
)
from dataflows.operators.summaries import summarise_group, summarise_person, unusable_value_reason
from schemas.definitions import Breakdown
from schemas.filters import NO_FILTERS
from schemas.funnels import FunnelDefinition, FunnelStep
from schemas.paths import PathDefinition
from state.records import StoredEvent, encode_person_events

pytestmark = pytest.mark.unit
BASE = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1000)


def _kept(rng: random.Random, n: int, steps: int, paths: bool) -> tuple[KeptColumns, dict[int, list[StoredEvent]]]:
    """Random kept events of a few persons: clustered times (some persons with two step events at
    one instant), days from the time, funnel step masks or path items."""
    persons, stamps, uuids, days, values = [], [], [], [], []
    for i in range(n):
        person = rng.randrange(1, 12)
        ts = BASE + rng.choice([rng.randrange(6 * 86_400_000), rng.randrange(40) * 600_000, 1_000 * rng.randrange(5)])
        if paths:
            value = orjson.dumps([rng.choice(["/", "/a", "/b", "Home"])]).decode()
        else:
            value = orjson.dumps([rng.randrange(1 << (steps + 1)) & ~1, 0, ""]).decode()
        persons.append(person)
        stamps.append(ts)
        uuids.append(f"{rng.randrange(1 << 32):08x}-{i}")
        days.append(datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y%m%d"))
        values.append(value)
    kept = KeptColumns(np.array(persons, dtype=np.int64), np.array(stamps, dtype=np.int64),
                       pa.array(uuids, pa.string()), pa.array(days, pa.string()), pa.array(values, pa.string()))
    by_person: dict[int, list[StoredEvent]] = {}
    for p, t, u, d, v in zip(persons, stamps, uuids, days, values, strict=True):
        by_person.setdefault(p, []).append(StoredEvent(t, d, u, v.encode()))
    return kept, by_person


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 100_000), steps=st.integers(1, 4), skipped=st.integers(0, 3))
def test_attempt_summaries_equal_the_summariser(seed: int, steps: int, skipped: int) -> None:
    rng = random.Random(seed)
    kept, by_person = _kept(rng, rng.randrange(0, 300), steps, paths=False)
    definition = FunnelDefinition(1, tuple(FunnelStep(f"s{k}", (), NO_FILTERS) for k in range(steps)), summaries=True)
    skip = set(rng.sample(sorted(by_person), min(skipped, len(by_person))))
    found = {p: (irregular, sorted(entries)) for p, (irregular, entries)
             in attempt_summaries(kept, steps, skip).per_person().items()}
    expected = {}
    for person, events in by_person.items():
        if person not in skip:
            summary = summarise_person(definition, str(person), encode_person_events(events))
            expected[person] = (summary.irregular, sorted(summary.entries))
    assert found == expected


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), skipped=st.integers(0, 3))
def test_session_summaries_equal_the_summariser(seed: int, skipped: int) -> None:
    rng = random.Random(seed)
    kept, by_person = _kept(rng, rng.randrange(0, 300), 0, paths=True)
    definition = PathDefinition(1, ("$pageview",), ())
    skip = set(rng.sample(sorted(by_person), min(skipped, len(by_person))))
    found = {p: sorted(entries) for p, (_, entries) in session_summaries(kept, skip).per_person().items()}
    expected = {person: sorted(summarise_person(definition, str(person), encode_person_events(events)).entries)
                for person, events in by_person.items() if person not in skip}
    assert found == expected


def test_a_person_with_two_step_events_at_one_instant_keeps_no_rows() -> None:
    """Irregular: the summariser's rule (empty rows on each day of a step event, flagged)."""
    rows = [(5, BASE, "a", "[2,0,\"\"]"), (5, BASE, "b", "[4,0,\"\"]"), (6, BASE, "c", "[2,0,\"\"]"),
            (6, BASE + 1000, "d", "[4,0,\"\"]")]
    kept = KeptColumns(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), pa.array([r[2] for r in rows]),
                       pa.array(["20240601"] * 4), pa.array([r[3] for r in rows]))
    found = attempt_summaries(kept, 2, set()).per_person()
    assert found[5] == (True, [("fa", "20240601", b"")])
    row = np.frombuffer(found[6][1][0][2], dtype="<i8")
    assert found[6][0] is False and row.tolist() == [6, BASE << 20, (BASE + 1000) << 20]


def test_only_definitions_keeping_summaries_are_summarised_by_columns() -> None:
    steps = tuple(FunnelStep(f"s{k}", (), NO_FILTERS) for k in range(2))
    assert by_columns(FunnelDefinition(1, steps, summaries=True))
    assert by_columns(PathDefinition(1, ("$pageview",), ()))
    assert not by_columns(FunnelDefinition(1, steps))  # strict, unordered, correlation: rows per day only
    assert not by_columns(FunnelDefinition(1, steps, summaries=True, breakdown=Breakdown((("event", "$browser"),))))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), steps=st.integers(0, 3))
def test_summaries_of_kept_strings_equal_the_summariser_and_leave_out_what_it_must_dead_letter(
        seed: int, steps: int) -> None:
    """The summariser's way for many dirty persons: their kept strings over columns. A person with an
    unreadable record, an unusable value or a time out of range is left to the per-person way."""
    rng = random.Random(seed)
    paths = steps == 0
    _, by_person = _kept(rng, rng.randrange(1, 300), max(steps, 1), paths=paths)
    definition = (PathDefinition(1, ("$pageview",), ()) if paths else
                  FunnelDefinition(1, tuple(FunnelStep(f"s{k}", (), NO_FILTERS) for k in range(steps)), summaries=True))
    raws = {p: encode_person_events(events) for p, events in by_person.items()}
    spoiled = sorted(raws)[:3]
    if len(spoiled) == 3:
        raws[spoiled[0]] += b"12,garbage"  # unreadable tail
        raws[spoiled[1]] += encode_person_events([StoredEvent(BASE, "20240601", "x", b"not json")])
        raws[spoiled[2]] += encode_person_events([StoredEvent(-10**14, "17000101", "y", b'[2,0,""]')])
    found = kept_summaries(definition, raws, lambda v: unusable_value_reason(definition.summary_kind, v) is None)
    expected = {}
    for person, raw in raws.items():
        summary = summarise_person(definition, str(person), raw)
        if not summary.dropped:
            expected[person] = (summary.irregular, sorted(summary.entries))
    assert {p: (irregular, sorted(entries)) for p, (irregular, entries) in found.items()} == expected


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), steps=st.integers(0, 3))
def test_groups_of_merged_persons_summarised_over_columns_equal_the_summariser(seed: int, steps: int) -> None:
    """A survivor's summaries from its whole group's events, every other member's emptied on the days
    it kept events of; a group with a member whose string does not read to its end is left out."""
    rng = random.Random(seed)
    paths = steps == 0
    _, by_person = _kept(rng, rng.randrange(1, 300), max(steps, 1), paths=paths)
    definition = (PathDefinition(1, ("$pageview",), ()) if paths else
                  FunnelDefinition(1, tuple(FunnelStep(f"s{k}", (), NO_FILTERS) for k in range(steps)), summaries=True))
    persons = sorted(by_person)
    rng.shuffle(persons)
    groups: dict[int, dict[int, bytes]] = {}
    while persons:
        members = [persons.pop() for _ in range(min(len(persons), rng.choice([1, 1, 2, 3])))]
        groups[members[0]] = {m: encode_person_events(by_person[m]) for m in members}
    spoiled = next((s for s, raws in groups.items() if len(raws) > 1), None)
    if spoiled is not None:
        member = next(m for m in groups[spoiled] if m != spoiled)
        groups[spoiled][member] += b"12,2024"  # a record cut short: joined, it would read into the next
    found = group_summaries(definition, groups, lambda v: unusable_value_reason(definition.summary_kind, v) is None)
    expected = {}
    for survivor, raws in groups.items():
        if survivor == spoiled:
            continue
        for member, summary in summarise_group(definition, str(survivor), {str(m): r for m, r in raws.items()}).items():
            expected[int(member)] = (summary.irregular, sorted(summary.entries))
    assert {p: (irregular, sorted(entries)) for p, (irregular, entries) in found.items()} == expected
