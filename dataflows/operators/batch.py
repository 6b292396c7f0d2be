"""What a live batch adds to one project's state, summed per key in the worker (no I/O).

Redis then receives one write per key touched (a count, a person set, a first-time candidate, a
definition's sums) instead of a script step per event: the home part (uuid guards, names, person
updates, offsets: state/lua/apply_batch.lua), then each state shard's part with its offset fence
(state/lua/apply_shard.lua), so an event counts once whatever is replayed or resent.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataflows.operators.persons import PersonUpdate, person_update
from schemas.events import TopicEvent
from state.records import day_row, person_record, sized_value

Contribution = tuple[str, str, Any]  # definition hash, breakdown value, value (number, text or None)


@dataclass(slots=True)
class Occurrence:
    """One event of a batch, its buckets (project-zone hour start and day), person update, place on
    the topic, person (None while unresolved) and contributions to registered definitions."""

    source: TopicEvent
    uuid: str
    event: str
    distinct_id: str
    hour: int
    day: str
    ts: int
    update: PersonUpdate
    partition: int
    offset: int
    person: int | None = None
    contributions: list[Contribution] | None = None

    @classmethod
    def of(cls, event: TopicEvent, hour: int, day: str, partition: int, offset: int) -> Occurrence:
        return cls(event, event.uuid, event.event, event.distinct_id, hour, day, event.ts_ms, person_update(event),
                   partition, offset)


def add_to_partial_sums(sums: list[float], v: float) -> None:
    """Add `v` to the last of a property's partial sums, or start a new one where the sum would be
    no double: Redis adds the parts in long double."""
    total = sums[-1] + v
    if math.isinf(total) or math.isnan(total):
        sums.append(v)
    else:
        sums[-1] = total


@dataclass
class DefinitionSums:
    """What a batch adds to a counting definition (trends, property maths, retention) in one shard,
    summed per key as `apply_definition` (definition_state.lua) would per event: events and persons
    per breakdown value and bucket, the values seen, property sums (partial sums where a double
    would overflow, so Redis adds them in long double), and with flags `l` every value, `a` events
    per person."""

    keep_values: bool = False
    per_actor: bool = False
    counts: dict[tuple[str, str, int | str], int] = field(default_factory=lambda: defaultdict(int))  # kind, bv, bucket
    # A batch's person sets; a backfill's are arrays, sorted and distinct (history.py).
    persons: dict[tuple[str, str, int | str], set[int] | np.ndarray] = field(default_factory=lambda: defaultdict(set))
    breakdowns: set[str] = field(default_factory=set)
    stats: dict[tuple[str, str], list[Any]] = field(default_factory=dict)  # (bv, h<hour>|d<day>) -> [sums, n, min, max]
    values: dict[tuple[str, str, int | str], list[float]] = field(default_factory=lambda: defaultdict(list))
    actors: dict[tuple[str, str, int | str], dict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def add(self, o: Occurrence, bv: str, v: Any, person: int) -> None:
        for kind, bucket in (("h", o.hour), ("d", o.day)):
            self.counts[(kind, bv, bucket)] += 1
            self.persons[(kind, bv, bucket)].add(person)  # type: ignore[union-attr]
            if self.per_actor:
                self.actors[(kind, bv, bucket)][person] += 1
        self.breakdowns.add(bv)
        if not isinstance(v, int | float) or isinstance(v, bool):
            return
        for kind, bucket in (("h", o.hour), ("d", o.day)):
            key = (bv, f"{kind}{bucket}")
            found = self.stats.get(key)
            if found is None:
                self.stats[key] = [[v], 1, v, v]
            else:
                add_to_partial_sums(found[0], v)
                found[1] += 1
                found[2], found[3] = min(found[2], v), max(found[3], v)
            if self.keep_values:
                self.values[(kind, bv, bucket)].append(v)


@dataclass
class ShardEffects:
    """What a batch adds to one state shard (the persons kept there), summed per key."""

    hour_counts: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    day_counts: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    hour_persons: dict[tuple[str, int], set[int]] = field(default_factory=lambda: defaultdict(set))
    day_persons: dict[tuple[str, str], set[int]] = field(default_factory=lambda: defaultdict(set))
    firsts: dict[str, dict[int, tuple[int, int, str]]] = field(default_factory=lambda: defaultdict(dict))
    kept_days: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    kept_persons: dict[int, dict[str, list[str]]] = field(default_factory=lambda: defaultdict(dict))  # by definition
    ranges: dict[int, list[int]] = field(default_factory=dict)  # partition -> [first offset, next offset]
    handovers: dict[tuple[str, int], int] = field(default_factory=dict)  # (definition, partition) -> first offset
    sums: dict[str, DefinitionSums] = field(default_factory=dict)  # counting definitions


@dataclass
class BatchEffects:
    """A batch's writes, summed: the project's home part (`apply_batch.lua`: uuid guards, event names,
    person updates, offsets) and each state shard's part (`apply_shard.lua`)."""

    guards: list[tuple[str, int, int, int]] = field(default_factory=list)  # uuid, partition, offset, person
    names: set[str] = field(default_factory=set)
    updates: list[Occurrence] = field(default_factory=list)  # events that set person properties, in order
    reached: dict[int, int] = field(default_factory=dict)  # partition -> next offset
    earliest: int | None = None
    shards: dict[int, ShardEffects] = field(default_factory=dict)

    @property
    def firsts(self) -> dict[str, dict[int, tuple[int, int, str]]]:
        """First-time candidates of every shard (persons are in one shard each)."""
        out: dict[str, dict[int, tuple[int, int, str]]] = defaultdict(dict)
        for shard in self.shards.values():
            for event, persons in shard.firsts.items():
                out[event].update(persons)
        return out


class KnownFirsts:
    """Per event name and person, a time at or after the person's first such event in state: an
    event no earlier needs no first-time candidate. Only ever lowered, and a bound on what Redis holds
    (another worker may hold earlier), so a stale entry costs a candidate, never a wrong count.
    Bounded: cleared when it grows past `limit` entries. `batch_effects` reads `times` directly: an
    event needs a candidate when its person has no time there for it, or a later one."""

    def __init__(self, limit: int = 2_000_000) -> None:
        self.limit = limit
        # Event name -> person -> time: the person's int is the key looked up per event, not an
        # (event, person) tuple (a tuple built, hashed and compared per event, and one more tracked
        # object per entry for the cyclic collector).
        self.times: dict[str, dict[int, int]] = {}

    def learn(self, firsts: dict[str, dict[int, tuple[int, int, str]]]) -> None:
        if sum(map(len, self.times.values())) > self.limit:  # forgetting only costs candidates
            self.times.clear()
        for event, persons in firsts.items():
            known = self.times.get(event)
            if known is None:
                known = self.times[event] = {}
            for person, (ts, _, _) in persons.items():
                held = known.get(person)
                if held is None or ts < held:
                    known[person] = ts


def batch_effects(occurrences: list[Occurrence], known: KnownFirsts, skip: set[str] | None = None,
                  flags: dict[str, str] | None = None, shards: int = 1,
                  fences: dict[int, dict[int, int]] | None = None) -> BatchEffects:
    """Sum a project's batch. Occurrences whose uuid is in `skip` (already applied) or repeats an
    earlier one of the batch, or without a person, only move the offsets. Person p's event state goes
    to shard p % shards, except below that shard's `fences` (shard -> partition -> next offset it
    has applied: a replay of what it holds). Contributions to definitions that keep events (`flags`
    with 'f': per day, 's': per person for summaries) become the rows and strings they keep, in event
    order; those to counting definitions are summed per key (`DefinitionSums`)."""
    out = BatchEffects()
    keeps = {h: ("f" in f, "s" in f) for h, f in (flags or {}).items() if "f" in f or "s" in f}
    sized: dict[str, str] = {}  # kept value -> its sized form (a batch has few distinct ones)
    taken: set[str] = set()
    # Hot loop (a fifth of the worker's thread in a backlog): containers bound to locals once.
    reached, guards, names, updates, by_shard = out.reached, out.guards, out.names, out.updates, out.shards
    earliest = None
    known_times = known.times
    no_times: dict[int, int] = {}
    for o in occurrences:
        partition, offset, uuid, p = o.partition, o.offset, o.uuid, o.person
        nxt = offset + 1
        if reached.get(partition, -1) < nxt:
            reached[partition] = nxt
        if p is None or uuid in taken or (skip and uuid in skip):
            continue
        taken.add(uuid)
        ev, ts = o.event, o.ts
        guards.append((uuid, partition, offset, p))
        names.add(ev)
        if earliest is None or ts < earliest:
            earliest = ts
        u = o.update
        if u.set or u.set_once or u.unset:
            updates.append(o)
        s = p % shards
        if fences and offset < fences.get(s, {}).get(partition, 0):
            continue
        sh = by_shard.get(s)
        if sh is None:
            sh = by_shard[s] = ShardEffects()
        span = sh.ranges.get(partition)
        if span is None:
            sh.ranges[partition] = [offset, nxt]
        else:
            if offset < span[0]:
                span[0] = offset
            if nxt > span[1]:
                span[1] = nxt
        hour_key, day_key = (ev, o.hour), (ev, o.day)
        sh.hour_counts[hour_key] += 1
        sh.day_counts[day_key] += 1
        sh.hour_persons[hour_key].add(p)
        sh.day_persons[day_key].add(p)
        first = known_times.get(ev, no_times).get(p)
        if first is None or ts < first:  # a first-time candidate (KnownFirsts)
            firsts = sh.firsts[ev]
            current = firsts.get(p)
            if current is None or ts < current[0]:
                firsts[p] = (ts, o.hour, o.day)
        if o.contributions:
            for c in o.contributions:
                h, _, v = c
                if (h, partition) not in sh.handovers:
                    sh.handovers[(h, partition)] = offset
                kept = keeps.get(h)
                if kept is None or not isinstance(v, str):
                    sums = sh.sums.get(h)
                    if sums is None:
                        f = (flags or {}).get(h, "")
                        sums = sh.sums[h] = DefinitionSums("l" in f, "a" in f)
                    sums.add(o, c[1], v, p)
                    continue
                per_day, per_person = kept
                if per_day:
                    sh.kept_days[(h, o.day)].append(day_row(p, ts, uuid, v))
                if per_person:
                    tail = sized.get(v)
                    if tail is None:
                        tail = sized[v] = sized_value(v)
                    by_definition = sh.kept_persons[p]
                    records = by_definition.get(h)
                    if records is None:
                        by_definition[h] = [person_record(ts, o.day, uuid, tail)]
                    else:
                        records.append(person_record(ts, o.day, uuid, tail))
    out.earliest = earliest
    return out
