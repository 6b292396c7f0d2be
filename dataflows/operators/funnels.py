"""Funnel step matching for one actor (spec §7.4, §7.5, §7.8, §19.7, §19.13), as PostHog's funnel UDF.

Input: the actor's step events inside the query range, each with the 1-based steps it matches and
the exclusion ranges it hits. Output: the furthest step reached and the timestamps of the attempt
that first reached it. Pure: the query runs it over the state the dataflow keeps per funnel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class StepEvent:
    ts: float                    # seconds
    uuid: str
    steps: tuple[int, ...]       # 1-based steps the event matches
    exclusions: tuple[int, ...] = ()  # 1-based k: "between step k-1 and step k" (PostHog's -k tags)
    breakdown: str = ""
    name: str = ""                   # kept for correlation only
    properties: dict | None = None   # kept for correlation's event_with_properties only


@lru_cache(maxsize=4096)
def step_bits(mask: int) -> tuple[int, ...]:
    """The 1-based steps (or exclusion tags) a kept mask holds: bit k is k."""
    return tuple(k for k in range(1, mask.bit_length()) if mask >> k & 1)


@dataclass(frozen=True, slots=True)
class FunnelResult:
    steps_reached: int           # 1-based count of steps completed (0: never entered)
    timestamps: tuple[float, ...]

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.timestamps, self.timestamps[1:], strict=False)]


@dataclass(slots=True)
class _Attempt:
    start: float
    times: tuple[float, ...]
    uuids: tuple[str, ...]
    excluded: bool = False


@dataclass(slots=True)
class _State:
    reached: list[_Attempt | None] = field(default_factory=list)
    best: _Attempt | None = None
    best_k: int = 0


def _sorted(events: Iterable[StepEvent]) -> list[StepEvent]:
    return sorted(events, key=lambda e: (e.ts, e.uuid))


def ordered(events: Iterable[StepEvent], steps: int, window: float, strict: bool = False) -> FunnelResult | None:
    """Ordered (and strict) funnels. None when the actor's counted attempt was excluded (§7.5)."""
    state = _State([None] * (steps + 1))
    for group in _same_instant(_sorted(events)):
        ts = group[0].ts
        pairs = sorted(((k, e) for e in group for k in e.steps if 1 <= k <= steps), key=lambda p: p[0])
        before = list(state.reached)
        for k, event in pairs:
            _advance(state, k, event, window, before)
        for event in group:
            for k in event.exclusions:
                _exclude(state, k, ts, window)
        if strict:
            matched = {k for e in group for k in e.steps}
            for k in range(1, steps + 1):
                if k not in matched:
                    state.reached[k] = None
    if state.best is None:
        return None if state.best_k else FunnelResult(0, ())
    if state.best.excluded:
        return None
    return FunnelResult(state.best_k, state.best.times)


def _same_instant(events: list[StepEvent]) -> Iterable[list[StepEvent]]:
    """Consecutive runs of events sharing a timestamp (most runs have one event)."""
    start = 0
    for i in range(1, len(events) + 1):
        if i == len(events) or events[i].ts != events[start].ts:
            yield events[start:i]
            start = i


def _advance(state: _State, k: int, event: StepEvent, window: float, before: list[_Attempt | None]) -> None:
    """Steps of one timestamp are taken in ascending order so that different events at the same
    instant chain (§7.4); an event whose own lower step just restarted an attempt extends the attempt
    as it stood before this instant instead (an event never advances one attempt twice)."""
    t = event.ts
    prev = _Attempt(t, (), ()) if k == 1 else state.reached[k - 1]
    if prev is not None and event.uuid in prev.uuids:
        prev = before[k - 1] if k > 1 else None
    if prev is None or t - prev.start > window or prev.excluded or event.uuid in prev.uuids:
        return
    current = state.reached[k]
    if current is not None and current.start == prev.start:
        return  # this attempt already completed step k: the earliest completion is kept
    record = _Attempt(prev.start, (*prev.times, t), (*prev.uuids, event.uuid), prev.excluded)
    state.reached[k] = record
    if k > state.best_k:
        state.best, state.best_k = record, k


def _exclude(state: _State, k: int, t: float, window: float) -> None:
    """An exclusion between step k-1 and step k hits the attempt at k-1 that has not reached k (§19.7)."""
    if k < 2 or k - 1 >= len(state.reached):
        return
    attempt = state.reached[k - 1]
    if attempt is None or attempt.excluded or t - attempt.start > window:
        return
    done = state.reached[k] if k < len(state.reached) else None
    if done is not None and done.start == attempt.start:
        return
    attempt.excluded = True
    if state.best_k == k - 1 and state.best is not None:
        state.best.excluded = True


def unordered(events: Iterable[StepEvent], steps: int, window: float) -> FunnelResult:
    """Unordered funnels (E3 sliding window, §7.8); an exclusion stops the running attempt (§19.13)."""
    queues: list[list[float]] = [[] for _ in range(steps + 1)]
    best = FunnelResult(0, ())
    for event in _sorted(events):
        t = event.ts
        if event.exclusions:
            queues = [[] for _ in range(steps + 1)]
            continue
        candidates = [k for k in event.steps if 1 <= k <= steps]
        if not candidates:
            continue
        k = min(candidates, key=lambda s: (queues[s][-1] if queues[s] else float("-inf"), s))
        queues[k].append(t)
        for q in queues:
            while q and q[0] < t - window:
                q.pop(0)
        done = [q[0] for q in queues[1:] if q]
        if len(done) > best.steps_reached:
            best = FunnelResult(len(done), tuple(sorted(done)))
    return best


def funnel(events: Sequence[StepEvent], steps: int, window: float, order: str) -> FunnelResult | None:
    if order == "unordered":
        return unordered(events, steps, window)
    return ordered(events, steps, window, strict=order == "strict")


def ordered_attempts(events: Sequence[StepEvent], steps: int, window: float,
                     order: str) -> list[tuple[float, int]] | None:
    """Every attempt of the actor: (start time, steps it reached), for funnel trends (§7.10).

    An attempt starts at each step-1 event (each step event for unordered funnels) and is
    evaluated on its own. None when the actor is disqualified by an exclusion (§19.7).
    """
    if order != "unordered" and funnel(events, steps, window, order) is None:
        return None
    evs = _sorted(events)
    out = []
    for i, event in enumerate(evs):
        if order == "unordered":
            if not event.steps:
                continue
            tail = [e for e in evs[i:] if e.ts - event.ts <= window]
            out.append((event.ts, unordered(tail, steps, window).steps_reached))
            continue
        if 1 not in event.steps:
            continue
        later = [e if 1 not in e.steps else replace(e, steps=tuple(k for k in e.steps if k != 1)) for e in evs[i + 1:]]
        result = ordered([event, *later], steps, window, strict=order == "strict")
        out.append((event.ts, result.steps_reached if result is not None else 0))
    return out
