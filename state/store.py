"""Applying planned events to Redis: the only place the dataflow writes project state.

The worker sums a project's batch per key (dataflows/operators/batch.py); one Lua call applies it
atomically with the uuid guard of each of its events (`apply_batch.lua`). A batch holding an event
applied already writes nothing and is summed again without it, so a replay after a crash, an SDK
resend or an overlapping backfill never applies an event twice: counts may use HINCRBY because the
guards and the increments commit together (ARCHITECTURE rule 2). Every other write is
order-insensitive: set membership, minimum first-seen time, and person properties ordered by event
time rather than arrival.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis

from schemas.definitions import Definition
from schemas.events import TopicEvent
from state import keys, scripts

if TYPE_CHECKING:  # the batch is summed by the dataflow's pure operator; only its shape is read here
    from dataflows.operators.batch import BatchEffects


@dataclass
class Applied:
    """What an apply call did: events newly applied, and definitions whose state Redis refused."""

    events: int = 0
    failed: dict[tuple[int, str], str] = field(default_factory=dict)  # (project, hash) -> reason


class RedisLostWrites(RuntimeError):
    """Redis came back without writes this process made (it crashed between AOF syncs): the dataflow
    restarts so its sources resume from the offsets Redis has, and re-apply what was lost."""


def _failures(project_id: int, answer: list[object]) -> dict[tuple[int, str], str]:
    pairs = answer[1:]
    return {(project_id, _text(pairs[i])): _text(pairs[i + 1]) for i in range(0, len(pairs), 2)}


def _final(merged: dict[int, int], person: int) -> int:
    seen = {person}
    while person in merged and merged[person] not in seen:
        person = merged[person]
        seen.add(person)
    return person


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _json_values(values: dict[str, object]) -> str:
    """Encode each value once, here, so Lua stores PostHog's JSON text untouched."""
    if not values:
        return ""
    return orjson.dumps({str(k): orjson.dumps(v).decode() for k, v in values.items()}).decode()


def batch_args(project_id: int, generation: int, flags: dict[str, str], effects: BatchEffects) -> list[Any]:
    """The arguments of `apply_batch.lua`: its header, and the batch as one JSON object of sections
    whose rows follow `scripts.BATCH_SECTIONS` (one argument: the client encodes it in one go)."""
    bits = [["h", ev, hour, list(persons)] for (ev, hour), persons in effects.hour_persons.items()]
    bits += [["d", ev, day, list(persons)] for (ev, day), persons in effects.day_persons.items()]
    counts = [["h", ev, hour, n] for (ev, hour), n in effects.hour_counts.items()]
    counts += [["d", ev, day, n] for (ev, day), n in effects.day_counts.items()]
    batch = {
        "G": [[keys.seen_bucket(uuid), uuid, f"{partition}:{offset}"] for uuid, partition, offset in effects.guards],
        "C": counts,
        "B": bits,
        "F": [[ev, [[p, ts, hour, day] for p, (ts, hour, day) in persons.items()]]
              for ev, persons in effects.firsts.items() if persons],
        "N": sorted(effects.names),
        "U": [[o.person, o.ts, _json_values(o.update.set), _json_values(o.update.set_once),
               orjson.dumps(o.update.unset).decode() if o.update.unset else ""] for o in effects.updates],
        "O": [[partition, nxt] for partition, nxt in effects.reached.items()],
        "H": [[h, partition, offset] for (h, partition), offset in effects.handovers.items()],
        "KD": [[h, day, rows] for (h, day), rows in effects.kept_days.items()],
        "KP": [[h, person, "".join(kept)] for (h, person), kept in effects.kept_persons.items()],
        "D": [[h, bv, v, o.person, o.hour, o.day, o.ts, o.uuid] for o, (h, bv, v) in effects.contributions],
        "earliest": effects.earliest,
    }
    return [keys.project_prefix(project_id), generation, orjson.dumps(flags), orjson.dumps(batch)]


@dataclass(frozen=True, slots=True)
class BackfillRow:
    """One offset of a partition's history for a definition's backfill."""

    offset: int
    event: TopicEvent | None = None
    hour: int = 0
    day: str = ""
    contribution: tuple[str, float | None] | None = None


@dataclass
class ProjectBatch:
    """One project's batch, summed (dataflows/operators/batch.py) against the definitions of
    `generation` (their flags: definition hash -> flags)."""

    project_id: int
    effects: BatchEffects
    flags: dict[str, str] = field(default_factory=dict)
    generation: int = 0


@dataclass
class BatchOutcome:
    """What one apply call did with each project: applied, refused as planned against outdated
    definitions (`stale`: plan again), or refused because some of its events were applied already
    (`repeated`: plan again without them). Refused batches wrote nothing."""

    applied: Applied = field(default_factory=Applied)
    stale: set[int] = field(default_factory=set)
    repeated: dict[int, set[str]] = field(default_factory=dict)


@dataclass
class Resolved:
    """Persons as `resolve_persons.lua` left them: every distinct id it was asked about that has a
    person, and the merges it made (merged person, the person it became), in order."""

    persons: dict[str, int] = field(default_factory=dict)
    merges: list[tuple[int, int]] = field(default_factory=list)


class StateStore:
    """Redis-backed insight state for the dataflow."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._apply = client.register_script(scripts.APPLY_BATCH.source)
        self._resolve = client.register_script(scripts.RESOLVE_PERSONS.source)
        self._backfill = client.register_script(scripts.BACKFILL_EVENTS.source)

    def resolve_persons(self, asks: dict[int, list[tuple[str, str, str, str]]]) -> dict[int, Resolved]:
        """Per project, (uuid, distinct id, link kind or '', other distinct id or '') of events in batch
        order whose persons the worker cannot tell alone: creates persons for new distinct ids and
        applies identity links, skipping events already applied."""
        pipe = self.redis.pipeline(transaction=False)
        owners = []
        for project_id, items in asks.items():
            args: list[str | int] = [keys.project_prefix(project_id), len(items)]
            for uuid, did, kind, other in items:
                args += [keys.seen_bucket(uuid), uuid, did, kind, other]
            self._resolve(keys=[keys.distinct_ids(project_id)], args=args, client=pipe)
            owners.append(project_id)
        out: dict[int, Resolved] = {}
        for project_id, answer in zip(owners, pipe.execute() if owners else [], strict=True):
            pairs = int(answer[0])
            flat = answer[1:]
            persons = {_text(flat[2 * i]): int(flat[2 * i + 1]) for i in range(pairs)}
            rest = flat[2 * pairs:]
            merges = [(int(rest[i]), int(rest[i + 1])) for i in range(0, len(rest), 2)]
            out[project_id] = Resolved(persons, merges)
        return out

    def survivors(self, persons: dict[int, set[int]]) -> dict[int, dict[int, int]]:
        """Per project, which of these persons were merged, and the person each became (following
        merges of merges)."""
        out: dict[int, dict[int, int]] = {}
        pending = {pid: sorted(ps) for pid, ps in persons.items() if ps}
        while pending:
            pipe = self.redis.pipeline(transaction=False)
            for pid, ps in pending.items():
                pipe.hmget(keys.merged(pid), ps)
            found: dict[int, list[int]] = {}
            for (pid, ps), targets in zip(pending.items(), pipe.execute(), strict=True):
                for p, target in zip(ps, targets, strict=True):
                    if target is not None:
                        merged = out.setdefault(pid, {})
                        merged[p] = int(target)
                        found.setdefault(pid, []).append(int(target))
            pending = {pid: sorted(set(ts)) for pid, ts in found.items()}
        return {pid: {p: _final(m, p) for p in m} for pid, m in out.items()}

    def apply(self, batches: Iterable[ProjectBatch]) -> BatchOutcome:
        """Apply each project's summed batch in one atomic call (pipelined over projects)."""
        outcome = BatchOutcome()
        pipe = self.redis.pipeline(transaction=False)
        owners: list[int] = []
        for batch in batches:
            args = batch_args(batch.project_id, batch.generation, batch.flags, batch.effects)
            self._apply(keys=[keys.distinct_ids(batch.project_id)], args=args, client=pipe)
            owners.append(batch.project_id)
        for owner, answer in zip(owners, pipe.execute() if owners else [], strict=True):
            code = int(answer[0])
            if code == -1:
                outcome.stale.add(owner)
            elif code == -2:
                outcome.repeated[owner] = {_text(u) for u in answer[1:]}
            else:
                outcome.applied.events += code
                outcome.applied.failed.update(_failures(owner, answer))
        return outcome

    def backfill(self, definition: Definition, partition: int, items: list[BackfillRow],
                 written_up_to: int = -1) -> Applied:
        """Apply one partition's history to a definition, offset by offset (a row without an event is
        an offset of nothing to apply). `written_up_to` is the last offset this process wrote for it;
        a fence behind it means Redis lost writes (`RedisLostWrites`)."""
        args: list[str | int] = [keys.project_prefix(definition.project_id), definition.hash,
                                 definition.flags, partition, len(items)]
        for row in items:
            if row.event is None or row.contribution is None:
                args += ["", "", row.offset, "", 0, "", 0, ""]
                continue
            event = row.event
            args += [keys.seen_bucket(event.uuid), event.uuid, row.offset, event.distinct_id, row.hour, row.day,
                     event.ts_ms, orjson.dumps(list(row.contribution)).decode()]
        args.append(written_up_to)
        answer = self._backfill(keys=[keys.distinct_ids(definition.project_id)], args=args)
        if int(answer[0]) == -2:
            raise RedisLostWrites(f"the backfill fence of {definition.hash} on partition {partition} is behind "
                                  f"offset {written_up_to}, which this process wrote")
        return Applied(int(answer[0]), _failures(definition.project_id, answer))
