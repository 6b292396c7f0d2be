"""Merged persons folded into their survivors at query time (state/overrides.py; no services)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from state.overrides import Overrides
from state.reads import read_bitmap


def _stored(persons: set[int]) -> np.ndarray:
    """A person set as Redis stores it (SETBIT: person i is bit 7 - i % 8 of byte i // 8)."""
    out = np.zeros(max(persons, default=-1) // 8 + 1, dtype=np.uint8)
    for p in persons:
        out[p >> 3] |= 1 << (7 - (p & 7))
    return out


def _persons(overrides: Overrides, persons: set[int]) -> int:
    """The set as queries read it: an integer with bit i = person i."""
    return read_bitmap(overrides.person_set(_stored(persons)).tobytes())


def _bits(persons: set[int]) -> int:
    return sum(1 << p for p in persons)


def test_merges_of_merges_end_at_the_last_survivor() -> None:
    overrides = Overrides.from_merges({3: 2, 2: 1, 9: 4})
    assert overrides.final == {3: 1, 2: 1, 9: 4}
    assert {t: sorted(m) for t, m in overrides.members.items()} == {1: [2, 3], 4: [9]}
    assert overrides.group(3) == (1, 2, 3) and overrides.group(1) == (1, 2, 3) and overrides.group(7) == (7,)


def test_a_person_set_moves_merged_bits_to_survivors() -> None:
    overrides = Overrides.from_merges({3: 1, 6: 100})
    assert _persons(overrides, {3, 5}) == _bits({1, 5})
    assert _persons(overrides, {1, 3}) == _bits({1})  # two persons of one group count once
    assert overrides.count(_stored({1, 3})) == 1 and overrides.count(_stored({3, 5, 6})) == 3
    assert _persons(overrides, {6}) == _bits({100})  # a survivor past the set's last byte
    assert _persons(overrides, {5}) == _bits({5}) and _persons(overrides, set()) == 0
    assert _persons(Overrides(), {3}) == _bits({3})


def test_counts_per_person_add_up_under_the_survivor() -> None:
    assert Overrides.from_merges({3: 1}).per_person({1: 2, 3: 5, 4: 1}) == {1: 7, 4: 1}


@given(st.dictionaries(st.integers(0, 300), st.integers(0, 300), max_size=40), st.sets(st.integers(0, 300)))
def test_a_person_set_equals_the_set_of_final_persons(merged: dict[int, int], persons: set[int]) -> None:
    merged = {s: t for s, t in merged.items() if s != t}
    overrides = Overrides.from_merges(merged)
    finals = {overrides.person(p) for p in persons}
    assert _persons(overrides, persons) == _bits(finals)
    assert overrides.count(_stored(persons)) == len(finals)


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=60))
def test_merges_applied_one_by_one_equal_the_merges_read_whole(made: list[tuple[int, int]]) -> None:
    """As `persons.lua` makes them: a person is merged once, into a person not merged yet."""
    merged: dict[int, int] = {}
    incremental = Overrides()
    for source, target in made:
        if source == target or source in merged or target in merged:
            continue
        merged[source] = target
        incremental.merge(source, target)
    whole = Overrides.from_merges(merged)
    assert incremental.final == whole.final
    assert {t: sorted(m) for t, m in incremental.members.items() if m} == {
        t: sorted(m) for t, m in whole.members.items()}


def test_a_person_bitmap_written_whole_reads_back_as_its_persons() -> None:
    from state.reads import person_bitmap

    for persons in ([0], [7, 8], [3, 150_000, 9, 64], list(range(0, 1000, 3))):
        assert read_bitmap(person_bitmap(persons)) == sum(1 << p for p in set(persons))
