"""Ordered funnel attempts summarised per person (spec §7.4), so a query reads attempts, not events.

Under the E3 rules each step-1 event starts an attempt whose progress depends only on the events at
or after it: step k is completed by the first step-k event (in (time, uuid) order) at or after the
time step k-1 was, other than the events the attempt already used (events of one instant chain in
step order). That chain does not depend on the conversion window nor on the date range: a window W
and an upper bound `to` keep the prefix with `g_k - start <= W` and `g_k <= to`. So one row per
attempt, (start, g_2, ..., g_n), answers every window and every range; the person's result is the
attempt that reaches furthest, and among those the first to get there (then the latest start),
which is the attempt PostHog's funnel UDF reports. Pure: the dataflow's summariser writes the rows,
the query evaluates them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MISSING = 1 << 62  # a step the chain never completes: later than any `to`
RANK_BITS = 20     # row times are `ms << RANK_BITS | rank`: rank orders one person's events of one instant


@dataclass(frozen=True, slots=True)
class PersonEvent:
    ts_ms: int
    uuid: str
    steps: int  # bit k set: the event matches 1-based step k


def regular(events: Sequence[PersonEvent]) -> bool:
    """No two step events of the person share an instant. Only then are attempts independent: at
    one instant the UDF lets a new step-1 event take over an older attempt before that instant's
    later steps are matched, so such persons are evaluated by the UDF over their events instead."""
    instants = [e.ts_ms for e in events if e.steps]
    return len(set(instants)) == len(instants)


def attempt_chains(events: Sequence[PersonEvent], steps: int) -> list[tuple[int, ...]]:
    """Rows (start, g_2, ..., g_n) as `ms << RANK_BITS | rank`, MISSING after the chain stops: one per
    step-1 event of a `regular` person (for whom the steps and trends views see the same attempts)."""
    ordered = sorted(events, key=lambda e: (e.ts_ms, e.uuid))
    times = [e.ts_ms for e in ordered]
    keys, rank = [], 0
    for i, t in enumerate(times):
        rank = rank + 1 if i and times[i - 1] == t else 0
        keys.append(t << RANK_BITS | rank)
    at_step: list[list[int]] = [[] for _ in range(steps + 1)]  # indices of the events matching each step
    for i, event in enumerate(ordered):
        mask = event.steps
        for k in range(1, steps + 1):
            if mask >> k & 1:
                at_step[k].append(i)
    step_times = [[times[i] for i in idx] for idx in at_step]
    rows = []
    for start in at_step[1]:
        row, used, current = [keys[start]], {start}, times[start]
        for k in range(2, steps + 1):
            idx = at_step[k]
            j = bisect_left(step_times[k], current)
            while j < len(idx) and idx[j] in used:
                j += 1
            if j == len(idx):
                break
            used.add(idx[j])
            current = times[idx[j]]
            row.append(keys[idx[j]])
        rows.append((*row, *([MISSING] * (steps - len(row)))))
    return rows


@dataclass(frozen=True)
class Outcomes:
    """Per actor: the steps reached and the times (seconds) of the attempt that counts."""

    persons: np.ndarray   # int person ids
    reached: np.ndarray   # int, 1..n
    times: np.ndarray     # float seconds, shape (actors, steps); NaN past `reached`


def _reached(chosen: np.ndarray, window_ms: int, hi_ms: int) -> np.ndarray:
    """Steps each attempt completes within the window and by `hi` (chains are increasing)."""
    limit = np.minimum((chosen[:, 0] >> RANK_BITS) + window_ms, hi_ms) << RANK_BITS | ((1 << RANK_BITS) - 1)
    reached = np.ones(len(chosen), dtype=np.int64)
    alive = np.ones(len(chosen), dtype=bool)
    for k in range(1, chosen.shape[1]):
        alive &= chosen[:, k] <= limit
        reached += alive
    return reached


def _in_range(rows: np.ndarray, lo_ms: int, hi_ms: int) -> np.ndarray:
    start = rows[:, 0] >> RANK_BITS
    return (start >= lo_ms) & (start <= hi_ms)


def best_attempts(persons: np.ndarray, rows: np.ndarray, window_ms: int, lo_ms: int, hi_ms: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each person's counted attempt among rows starting in [lo, hi]: (persons, reached, ms rows).

    `rows` are attempt_chains rows. Among the attempts reaching furthest the UDF reports the first to
    get there; at one instant, the one whose previous step came latest (it holds that step)."""
    keep = _in_range(rows, lo_ms, hi_ms)
    who, chosen = (persons, rows) if keep.all() else (persons[keep], rows[keep])
    if not len(chosen):
        return who, np.zeros(0, dtype=np.int64), chosen
    reached = _reached(chosen, window_ms, hi_ms)
    size = int(who.max()) + 1
    top = np.zeros(size, dtype=np.int64)
    np.maximum.at(top, who, reached)
    pick = np.flatnonzero(reached == top[who])
    # Narrow each person's candidates without sorting: earliest completion of the furthest step,
    # then the latest previous step, the one before, ..., then the latest start.
    pick = _narrow(who, pick, chosen[pick, reached[pick] - 1], size, lowest=True)
    for back in range(1, chosen.shape[1]):
        if np.bincount(who[pick], minlength=size).max() <= 1:
            break
        column = reached[pick] - 1 - back
        key = np.where(column >= 0, chosen[pick, np.maximum(column, 0)], 0)
        pick = _narrow(who, pick, key, size, lowest=False)
    return who[pick], reached[pick], chosen[pick] >> RANK_BITS


def _narrow(who: np.ndarray, pick: np.ndarray, key: np.ndarray, size: int, lowest: bool) -> np.ndarray:
    """The candidates whose key is their person's lowest (or highest)."""
    best = np.full(size, np.iinfo(np.int64).max if lowest else -1, dtype=np.int64)
    (np.minimum if lowest else np.maximum).at(best, who[pick], key)
    return pick[key == best[who[pick]]]


def outcomes(persons: np.ndarray, reached: np.ndarray, rows: np.ndarray) -> Outcomes:
    """Rows of counted attempts as seconds, with the steps past `reached` blanked."""
    steps = rows.shape[1] if rows.ndim == 2 else 0
    times = rows.astype(np.float64) / 1000 if len(rows) else np.zeros((0, steps))
    if len(rows):
        times[np.arange(steps)[None, :] >= reached[:, None]] = np.nan
    return Outcomes(persons, reached, times)


def entrances(persons: np.ndarray, rows: np.ndarray, window_ms: int, lo_ms: int, hi_ms: int,
              bounds_ms: np.ndarray, from_step: int, to_step: int) -> tuple[list[int], list[int]]:
    """Funnel trends (§7.10): per entrance period, persons with an attempt starting there that reached
    `from_step` and `to_step` (0-based)."""
    keep = _in_range(rows, lo_ms, hi_ms)
    who, chosen = persons[keep], rows[keep]
    periods = len(bounds_ms)
    if not len(chosen):
        return [0] * periods, [0] * periods
    reached = _reached(chosen, window_ms, hi_ms)
    period = np.searchsorted(bounds_ms, chosen[:, 0] >> RANK_BITS, side="right") - 1
    inside = period >= 0

    size = int(who.max()) + 1

    def persons_per_period(mask: np.ndarray) -> list[int]:
        pairs = period[mask] * size + who[mask]
        if periods * size <= 50_000_000:  # mark (period, person) cells: no sort
            cells = np.zeros(periods * size, dtype=bool)
            cells[pairs] = True
            return cells.reshape(periods, size).sum(axis=1).tolist()
        return np.bincount(np.unique(pairs) // size, minlength=periods).tolist()

    return (persons_per_period(inside & (reached >= from_step + 1)),
            persons_per_period(inside & (reached >= to_step + 1)))
