"""Per-person summaries of a backfill's kept events, computed over columns (no I/O).

After a funnel or paths definition is backfilled from the archive, every person it kept events of
is dirty, and summarising them one by one (parse the kept string, one `orjson` per event, the
attempt chain in Python) took most of the build. The backfill already holds those events as
columns, so their summaries are computed here for all persons at once, with sorts and binary
searches instead of per-person loops. The result is byte for byte what `summaries.py` makes from the
same events: attempt rows (`fa`) of ordered funnels, sessions (`ps`) of paths.

Only the simple cases are taken, and the rest stay dirty for the summariser: funnels broken down
(first/last touches), persons with two step events at one instant (irregular: they keep no rows,
which the summariser writes), persons of a merge (their summaries are made from a group).

The summariser and queries take the same way for many dirty persons at once (`group_summaries`:
after a backlog, every person it touched), from their kept strings, merged persons by group (the
survivor's from the whole group's events, the others' emptied).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from dataflows.operators.funnel_attempts import MISSING, RANK_BITS
from dataflows.operators.path_sessions import SESSION_GAP_MS
from schemas.events import in_event_range
from schemas.funnels import read_kept
from state.records import encode_sessions, person_event_columns

Entry = tuple[str, str, bytes]  # (summary kind, day, value), as summaries.py makes them


@dataclass
class KeptColumns:
    """Kept events as columns, one row each: person, ms, uuid, project-zone day (YYYYMMDD) and the
    kept value (the definition's contribution, JSON)."""

    persons: np.ndarray  # int64
    stamps: np.ndarray   # int64 ms
    uuids: pa.Array      # string
    days: pa.Array       # string
    values: pa.Array     # string

    @staticmethod
    def concat(parts: list[KeptColumns]) -> KeptColumns:
        def strings(arrays: list[pa.Array]) -> pa.Array:
            return pa.chunked_array(arrays, pa.string()).combine_chunks()

        return KeptColumns(np.concatenate([p.persons for p in parts]), np.concatenate([p.stamps for p in parts]),
                           strings([p.uuids for p in parts]), strings([p.days for p in parts]),
                           strings([p.values for p in parts]))

    def __len__(self) -> int:
        return len(self.persons)


@dataclass
class Summarised:
    """Summaries of many persons of one kind: the persons summarised (ascending), which of them are
    irregular, and the entries, (person, day, value), in person order."""

    kind: str
    persons: np.ndarray
    irregular: np.ndarray
    entry_persons: np.ndarray
    entry_days: list[str]
    values: list[bytes]

    @staticmethod
    def empty(kind: str) -> Summarised:
        nothing = np.zeros(0, dtype=np.int64)
        return Summarised(kind, nothing, nothing.astype(bool), nothing, [], [])

    def per_person(self) -> dict[int, tuple[bool, list[Entry]]]:
        """{person: (irregular, entries)}, as the summariser makes them (summaries.py)."""
        out: dict[int, tuple[bool, list[Entry]]] = {
            p: (irregular, []) for p, irregular in zip(self.persons.tolist(), self.irregular.tolist(), strict=True)}
        for p, day, value in zip(self.entry_persons.tolist(), self.entry_days, self.values, strict=True):
            out[p][1].append((self.kind, day, value))
        return out


@dataclass
class _Sorted:
    """The rows in PostHog's order per person, (person, time, uuid), with what both summaries need."""

    order: np.ndarray      # sorted row -> row of `kept`
    persons: np.ndarray
    stamps: np.ndarray
    position: np.ndarray   # one sortable number per (person, time): person-major, its times in order
    days: list[str]        # the distinct days
    day_of: np.ndarray     # each row's index into `days`
    value_of: np.ndarray   # each row's index into `values`
    values: list[str]      # the distinct kept values


def person_order(persons: np.ndarray, stamps: np.ndarray, uuids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(rows in PostHog's order per person, (person, time, uuid); each sorted row's position, one
    sortable number per (person, time): person-major, its times in order). Sorted over integers;
    only rows of one person at one instant are ordered by uuid, in Python (they are few)."""
    p, t = persons, stamps
    if int(p.max()) < 4 * len(p) + (1 << 20):  # person ids are dense: number them without a sort
        present = np.zeros(int(p.max()) + 1, dtype=np.int64)
        present[p] = 1
        count, dense = int(present.sum()), (np.cumsum(present) - 1)[p]
    else:
        found, dense = np.unique(p, return_inverse=True)
        count = len(found)
    low, span = int(t.min()), int(t.max()) - int(t.min()) + 1
    if count * span >= 1 << 62:
        raise ValueError("the kept events span too long a time to be sorted as one number")
    position = dense.astype(np.int64) * span + (t - low)
    order = np.argsort(position)  # rows of one position are put in uuid order below
    position = position[order]
    tied = np.flatnonzero(position[1:] == position[:-1])
    if len(tied):
        rows = np.unique(np.concatenate([tied, tied + 1]))
        found_uuids = uuids.take(pa.array(order[rows])).to_pylist()
        at = position[rows].tolist()
        by_uuid = sorted(range(len(rows)), key=lambda i: (at[i], found_uuids[i]))
        order[rows] = order[rows][by_uuid]
    return order, position


def _sorted(kept: KeptColumns) -> _Sorted:
    order, position = person_order(kept.persons, kept.stamps, kept.uuids)
    days = flat(pc.dictionary_encode(kept.days))
    values = flat(pc.dictionary_encode(kept.values))
    return _Sorted(order, kept.persons[order], kept.stamps[order], position, days.dictionary.to_pylist(),
                   days.indices.to_numpy(zero_copy_only=False).astype(np.int64)[order],
                   values.indices.to_numpy(zero_copy_only=False).astype(np.int64)[order], values.dictionary.to_pylist())


def flat(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One array, whether pyarrow handed back one or a chunked one."""
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def run_starts(*columns: np.ndarray) -> np.ndarray:
    """Where a run of equal rows (over all columns) starts, in sorted rows."""
    new = np.zeros(len(columns[0]), dtype=bool)
    new[:1] = True
    for column in columns:
        new[1:] |= column[1:] != column[:-1]
    return new


def _person_runs(persons: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each person, first row, end row) of rows sorted by person."""
    first = np.flatnonzero(run_starts(persons))
    return persons[first], first, np.append(first[1:], len(persons))


def _out_of_range(s: _Sorted) -> set[int]:
    """Persons with a kept event outside the range events can have: the summariser dead-letters it."""
    low, high = int(s.stamps.min()), int(s.stamps.max())
    if in_event_range(low) and in_event_range(high):
        return set()
    return {p for p, t in zip(s.persons.tolist(), s.stamps.tolist(), strict=True) if not in_event_range(t)}


def attempt_summaries(kept: KeptColumns, steps: int, skip: set[int]) -> Summarised:
    """The summaries of every person of `kept` not in `skip`, as `funnel_summary` makes them without
    a breakdown, from `chains_by_columns`."""
    if not len(kept):
        return Summarised.empty("fa")
    s = _sorted(kept)
    skip = skip | _out_of_range(s)
    masks = np.array([read_kept(v).steps for v in s.values], dtype=np.int64)[s.value_of]
    p = s.persons
    starts, chains, irregular = chains_by_columns(p, s.stamps, s.position, masks, steps, skip)
    rows = np.column_stack([p[starts], chains]).astype("<i8")
    packed, width = rows.tobytes(), rows.shape[1] * 8
    cut = np.flatnonzero(run_starts(p[starts], s.day_of[starts]))
    bounds = (np.append(cut, len(starts)) * width).tolist()
    values = [packed[a:b] for a, b in pairwise(bounds)]
    entry_persons, entry_days = p[starts][cut], s.day_of[starts][cut]
    if irregular:  # no rows, each day of a step event emptied
        step_rows = np.flatnonzero(masks != 0)
        mine = step_rows[np.isin(p[step_rows], np.array(sorted(irregular), dtype=np.int64))]
        pairs = np.unique(np.column_stack([p[mine], s.day_of[mine]]), axis=0)
        entry_persons = np.concatenate([entry_persons, pairs[:, 0]])
        entry_days = np.concatenate([entry_days, pairs[:, 1]])
        values += [b""] * len(pairs)
    persons, _, _ = _person_runs(p)
    return _summarised("fa", persons, np.isin(persons, np.array(sorted(irregular), dtype=np.int64)), skip,
                       entry_persons, [s.days[d] for d in entry_days.tolist()], values)


def chains_by_columns(p: np.ndarray, t: np.ndarray, position: np.ndarray, masks: np.ndarray, steps: int,
                      skip: set[int]) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """`attempt_chains` of every person at once, over rows in `person_order` (persons, times,
    positions and step masks of the sorted rows): (the rows that start an attempt, each attempt's
    (start, g_2, ..., g_n) as `ms << RANK_BITS | rank`, the irregular persons, who get none). For a
    regular person step k is the first step-k event strictly after step k-1: no two of its step
    events share an instant, so no event of the chain can be taken again."""
    same_instant = ~run_starts(p, t)
    first_of_instant = np.maximum.accumulate(np.where(same_instant, 0, np.arange(len(p))))
    rank = np.arange(len(p)) - first_of_instant
    if len(rank) and rank.max() >= 1 << RANK_BITS:
        raise ValueError("more kept events at one instant of one person than attempt rows can rank")
    key = t << RANK_BITS | rank
    step_rows = np.flatnonzero(masks != 0)
    clash = (p[step_rows[1:]] == p[step_rows[:-1]]) & (t[step_rows[1:]] == t[step_rows[:-1]])
    irregular = set(np.unique(p[step_rows[1:][clash]]).tolist())
    _, first, end = _person_runs(p)
    dense = np.repeat(np.arange(len(first)), end - first)
    usable = ~np.isin(p, np.array(sorted(skip | irregular), dtype=np.int64))
    starts = np.flatnonzero(usable & (masks >> 1 & 1).astype(bool))
    chains = np.full((len(starts), steps), MISSING, dtype=np.int64)
    chains[:, 0] = key[starts]
    current, alive = position[starts], np.ones(len(starts), dtype=bool)
    for k in range(2, steps + 1):
        candidates = np.flatnonzero(usable & (masks >> k & 1).astype(bool))
        if not len(candidates):
            break
        at = np.searchsorted(position[candidates], current, side="right")
        alive &= at < len(candidates)
        at = np.minimum(at, len(candidates) - 1)
        found = candidates[at]
        alive &= dense[found] == dense[starts]
        chains[alive, k - 1] = key[found[alive]]
        current = np.where(alive, position[found], current)
    return starts, chains, irregular


def _summarised(kind: str, persons: np.ndarray, irregular: np.ndarray, skip: set[int], entry_persons: np.ndarray,
                entry_days: list[str], values: list[bytes]) -> Summarised:
    """The persons not in `skip`, with their entries in person order."""
    keep = ~np.isin(persons, np.array(sorted(skip), dtype=np.int64))
    order = np.argsort(entry_persons, kind="stable")
    order = order[~np.isin(entry_persons[order], np.array(sorted(skip), dtype=np.int64))]
    return Summarised(kind, persons[keep], irregular[keep], entry_persons[order],
                      [entry_days[i] for i in order.tolist()], [values[i] for i in order.tolist()])


def session_summaries(kept: KeptColumns, skip: set[int]) -> Summarised:
    """The summaries of every person of `kept` not in `skip`, as `path_summary` makes
    them: sessions of two or more events, cut where consecutive events are 30 minutes apart, each
    under every day it touches."""
    if not len(kept):
        return Summarised.empty("ps")
    s = _sorted(kept)
    skip = skip | _out_of_range(s)
    items = [orjson.loads(v)[0] for v in s.values]
    p, t = s.persons, s.stamps
    new = run_starts(p)
    new[1:] |= (t[1:] - t[:-1]) >= SESSION_GAP_MS
    first = np.flatnonzero(new)
    end = np.append(first[1:], len(p))
    long = (end - first) > 1
    first, end = first[long], end[long]
    stamps, item_of, day_of = t.tolist(), s.value_of.tolist(), s.day_of.tolist()
    uuids = kept.uuids.take(pa.array(s.order)).to_pylist()
    by_person: dict[int, dict[str, list[list[list[object]]]]] = {}
    for a, b, who in zip(first.tolist(), end.tolist(), p[first].tolist(), strict=True):
        encoded = [stamps[a:b], uuids[a:b], [items[i] for i in item_of[a:b]]]
        days = by_person.setdefault(who, {})
        for d in dict.fromkeys(day_of[a:b]):
            days.setdefault(s.days[d], []).append(encoded)
    entries = [(who, day, encode_sessions(found)) for who, days in by_person.items() for day, found in days.items()]
    persons, _, _ = _person_runs(p)
    return _summarised("ps", persons, np.zeros(len(persons), dtype=bool), skip,
                       np.array([e[0] for e in entries], dtype=np.int64), [e[1] for e in entries],
                       [e[2] for e in entries])

def by_columns(definition: Any) -> bool:
    """Whether the backfill summarises this definition's persons over columns: ordered funnels not
    broken down, and paths."""
    if not getattr(definition, "summaries", False):
        return False
    return definition.summary_kind == "ps" or (definition.summary_kind == "fa" and definition.breakdown is None)


def summaries_by_columns(definition: Any, kept: KeptColumns, skip: set[int]) -> Summarised:
    """The summaries of every person of `kept` not in `skip` (`by_columns` definitions)."""
    if definition.summary_kind == "fa":
        return attempt_summaries(kept, len(definition.steps), skip)
    return session_summaries(kept, skip)


def kept_summaries(definition: Any, raws: dict[int, bytes], usable: Any) -> dict[int, tuple[bool, list[Entry]]]:
    """{person: (irregular, entries)} of persons summarised from their kept strings over columns
    (`by_columns` definitions), byte for byte what `summaries.py` makes. Left out, for the summariser's
    own way (which dead-letters what it cannot use): persons with an unreadable record, a value
    `usable(value)` refuses, or a time outside the events' range."""
    return group_summaries(definition, {person: {person: raw} for person, raw in raws.items()}, usable)


def group_summaries(definition: Any, groups: dict[int, dict[int, bytes]], usable: Any
                    ) -> dict[int, tuple[bool, list[Entry]]]:
    """{person: (irregular, entries)} of every member of the groups summarised over columns (each
    group: survivor -> {member: kept string}, the survivor among them), as `summarise_group` makes
    them: the survivor's from the events of its whole group, each other member's emptied on every day
    it kept events of. A group with a member whose string does not read to its end, or with anything
    else `kept_summaries` leaves out, is left out whole. Nothing when the columns cannot be summarised
    at all (times too far apart to sort as one number)."""
    kinds = ("fa", "fb") if definition.summary_kind == "fa" and definition.breakdown is not None else (
        definition.summary_kind,)
    persons: list[int] = []  # the columns: each event under its group's survivor
    stamps: list[int] = []
    uuids: list[str] = []
    days: list[str] = []
    values: list[bytes] = []
    emptied: dict[int, list[tuple[int, list[Entry]]]] = {}
    for survivor, raws in groups.items():
        if survivor not in raws:
            continue
        read = [(member, *person_event_columns(raw)) for member, raw in raws.items()]
        if any(columns[5] for columns in read):
            continue
        emptied[survivor] = [(member, [(kind, day, b"") for day in dict.fromkeys(member_days) for kind in kinds])
                             for member, _, member_days, _, _, _ in read if member != survivor]
        for _, member_stamps, member_days, member_uuids, member_values, _ in read:
            persons.extend([survivor] * len(member_stamps))
            stamps.extend(member_stamps)
            uuids.extend(member_uuids)
            days.extend(member_days)
            values.extend(member_values)
    refused = {v for v in set(values) if not usable(v)}
    if refused:  # a group with a value it cannot use goes the summariser's own way, whole
        bad = {p for p, v in zip(persons, values, strict=True) if v in refused}
        keep = [i for i, p in enumerate(persons) if p not in bad]
        persons, stamps, uuids, days, values = ([column[i] for i in keep]
                                                for column in (persons, stamps, uuids, days, values))
    if not persons:
        return {}
    try:
        kept = KeptColumns(np.array(persons, dtype=np.int64), np.array(stamps, dtype=np.int64),
                           pa.array(uuids, pa.string()), pa.array(days, pa.string()),
                           pa.array(values, pa.binary()).cast(pa.string()))
        found = summaries_by_columns(definition, kept, set()).per_person()
    except (ValueError, TypeError, pa.ArrowException):
        return {}
    out: dict[int, tuple[bool, list[Entry]]] = {}
    for survivor, summary in found.items():
        out[survivor] = summary
        for member, entries in emptied[survivor]:
            out[member] = (False, entries)
    return out
