"""Funnel event correlation (spec §8.3) over columns, for ordered funnels without exclusions (no I/O).

A correlation reads every event of every person in the range. Building one Python object per event
and running the funnel UDF person by person took most of a query over millions of events, so here
each person's counted attempt comes from the attempt chains of all persons at once
(`history_summaries.chains_by_columns`, the rule the summarised funnel path answers with, chosen by
`funnel_attempts.best_attempts`), and the events between an attempt's start and its end are
counted per event name with array operations. Persons with two step events at one instant
(irregular) go through the UDF itself. The numbers are those of `serving/funnels.py correlation`'s
per-person loop; only how they are computed changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dataflows.operators.funnel_attempts import Outcomes, best_attempts, outcomes
from dataflows.operators.funnels import StepEvent, funnel, step_bits
from dataflows.operators.history_summaries import chains_by_columns, person_order
from dataflows.operators.persons import as_survivors
from schemas.funnels import read_kept


@dataclass
class CorrelationEvents:
    """A correlation funnel's kept events in the query range, one row each: the person (as merges
    made it), ms, uuid, the steps mask (bit k: step k) and the event name (an index into `names`)."""

    persons: np.ndarray
    stamps: np.ndarray
    uuids: pa.Array
    masks: np.ndarray
    name_of: np.ndarray
    names: list[str]


def correlation_columns(persons: np.ndarray, stamps: np.ndarray, uuids: pa.Array, codes: np.ndarray,
                        values: list[str | None], merged: dict[int, int], low: float, high: float
                        ) -> CorrelationEvents | None:
    """A correlation funnel's kept events as `CorrelationEvents`: row i kept `values[codes[i]]`
    (None: nothing), merged persons read as the person they became, only rows in [low, high] ms.
    None if a kept value hit an exclusion (the per-person path handles those)."""
    persons = as_survivors(persons, merged)
    in_range = np.flatnonzero((stamps >= low) & (stamps <= high))
    used = np.zeros(len(values) + 1, dtype=bool)
    used[np.unique(codes[in_range])] = True
    kept = [read_kept(v) if v is not None and used[i] else None for i, v in enumerate(values)]
    if any(k is not None and k.excluded for k in kept):
        return None
    has = np.array([k is not None for k in kept] + [False], dtype=bool)
    rows = in_range[has[codes[in_range]]]
    names = sorted({k.name for k in kept if k is not None})
    name_index = {name: i for i, name in enumerate(names)}
    masks = np.array([k.steps if k is not None else 0 for k in kept] + [0], dtype=np.int64)
    name_of = np.array([name_index[k.name] if k is not None else -1 for k in kept] + [-1], dtype=np.int64)
    code = codes[rows]
    return CorrelationEvents(persons[rows], stamps[rows], uuids.take(pa.array(rows)), masks[code], name_of[code], names)


@dataclass(frozen=True)
class Counted:
    """Persons who converted, who did not, and per event name the persons of each kind who did it
    between their attempt's start and end."""

    success: int
    failure: int
    by_name: dict[str, tuple[int, int]]


def column_outcomes(events: CorrelationEvents, steps: int, window_s: float, lo_ms: int, hi_ms: int) -> Outcomes:
    """Each person's counted attempt (steps reached, step times in seconds) from a funnel's kept
    events already in [lo_ms, hi_ms]: the attempt chains of all persons at once, and the UDF itself
    for persons with two step events at one instant. Persons who reach no step are left out."""
    if not len(events.persons):
        return Outcomes(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, steps)))
    order, position = person_order(events.persons, events.stamps, events.uuids)
    p, t, masks = events.persons[order], events.stamps[order], events.masks[order]
    starts, chains, irregular = chains_by_columns(p, t, position, masks, steps, set())
    who, reached, rows = best_attempts(p[starts], chains, int(window_s * 1000), lo_ms, hi_ms)
    fast = outcomes(who, reached, rows.reshape(-1, steps))
    if not irregular:
        return fast
    mine = np.flatnonzero(np.isin(p, np.array(sorted(irregular), dtype=np.int64)))
    uuids = events.uuids.take(pa.array(order[mine])).to_pylist()
    by_person: dict[int, list[StepEvent]] = {}
    for person, ts, uuid, mask in zip(p[mine].tolist(), t[mine].tolist(), uuids, masks[mine].tolist(), strict=True):
        by_person.setdefault(person, []).append(StepEvent(ts / 1000, uuid, step_bits(mask)))
    extra = [(person, result) for person, found in by_person.items()
             if (result := funnel(found, steps, window_s, "ordered")) is not None and result.steps_reached]
    if not extra:
        return fast
    times = np.full((len(extra), steps), np.nan)
    for i, (_, result) in enumerate(extra):
        times[i, :len(result.timestamps)] = result.timestamps
    return Outcomes(np.concatenate([fast.persons, np.array([person for person, _ in extra], dtype=np.int64)]),
                    np.concatenate([fast.reached, np.array([r.steps_reached for _, r in extra], dtype=np.int64)]),
                    np.concatenate([fast.times, times]))


def event_correlation(events: CorrelationEvents, steps: int, window_s: float, lo_ms: int, hi_ms: int,
                      date_to_s: float, ignored: set[str]) -> Counted:
    """The counts `correlation` ranks, for `events` already in [lo_ms, hi_ms]; `ignored`: names not
    counted (the steps' and the request's excluded ones)."""
    if not len(events.persons):
        return Counted(0, 0, {})
    counted_attempts = column_outcomes(events, steps, window_s, lo_ms, hi_ms)
    who, converted = counted_attempts.persons, counted_attempts.reached == steps
    first = counted_attempts.times[:, 0]
    last = np.where(converted, counted_attempts.times[:, steps - 1], np.minimum(first + window_s, date_to_s))
    success = int(converted.sum())
    by_name: dict[str, tuple[int, int]] = {}
    if not len(who):
        return Counted(0, 0, by_name)
    counted = np.array([bool(name) and name not in ignored for name in events.names], dtype=bool)
    rank = np.argsort(who)
    at = np.searchsorted(who[rank], events.persons)
    at = np.minimum(at, len(who) - 1)
    has = who[rank][at] == events.persons
    index = rank[at]
    seconds = events.stamps / 1000
    inside = has & counted[events.name_of] & (first[index] < seconds) & (seconds < last[index])
    rows = np.flatnonzero(inside)
    pairs = np.unique(np.column_stack([events.name_of[rows], index[rows]]), axis=0).reshape(-1, 2)
    persons = np.bincount(pairs[:, 0], minlength=len(events.names))
    converting = np.bincount(pairs[:, 0], weights=converted[pairs[:, 1]], minlength=len(events.names))
    for code in np.flatnonzero(persons).tolist():
        s = int(converting[code])
        by_name[events.names[code]] = (s, int(persons[code]) - s)
    return Counted(success, len(who) - success, by_name)

