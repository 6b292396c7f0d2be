"""Applying planned events to Redis: the only place the dataflow writes project state.

One Lua call applies a batch of one project's events atomically. Each event is guarded by its uuid
(HSETNX in a dedupe bucket), so a replay after a crash, an SDK resend or an overlapping backfill
never applies an event twice: counts may use HINCRBY because the guard and the increment commit
together (ARCHITECTURE rule 2). Every other write is order-insensitive: set membership, minimum
first-seen time, and person properties ordered by event time rather than arrival.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import redis

from schemas.definitions import Definition
from schemas.events import TopicEvent
from state import keys, scripts

FIELDS_PER_EVENT = len(scripts.EVENT_FIELDS)
_CONTRIBUTIONS = scripts.APPLY_EVENTS.layout("E").index("contributions")


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


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _json_values(values: dict[str, object]) -> str:
    """Encode each value once, here, so Lua stores PostHog's JSON text untouched."""
    if not values:
        return ""
    return orjson.dumps({str(k): orjson.dumps(v).decode() for k, v in values.items()}).decode()


def _contributions(contributions: list[tuple[str, str, float | None]] | None) -> str:
    if not contributions:
        return ""
    return orjson.dumps([[h, bv, v] if v is not None else [h, bv] for h, bv, v in contributions]).decode()


def event_args(event: TopicEvent, hour: int, day: str, person: Any, partition: int = 0, offset: int = 0,
               contributions: list[tuple[str, str, float | None]] | None = None) -> list[str | int]:
    """The fixed-width argument block of one event for the apply script, in the order of
    `scripts.EVENT_FIELDS`: the event, its buckets (project-zone hour start and day) and its person
    update (`link_kind`, `other_distinct_id`, `set`, `set_once`, `unset`, as
    `dataflows/operators/persons.py` computes it)."""
    return [
        keys.seen_bucket(event.uuid), event.uuid, event.distinct_id, event.event, hour, day, event.ts_ms,
        person.link_kind or "", person.other_distinct_id or "",
        _json_values(person.set), _json_values(person.set_once),
        orjson.dumps(person.unset).decode() if person.unset else "",
        partition, offset, _contributions(contributions),
    ]


def set_contributions(args: list[str | int], contributions: list[tuple[str, str, float | None]] | None) -> None:
    """Put an event's definition contributions into its encoded block (they are planned per batch)."""
    args[_CONTRIBUTIONS] = _contributions(contributions)


@dataclass(frozen=True, slots=True)
class BackfillRow:
    """One offset of a partition's history for a definition's backfill."""

    offset: int
    event: TopicEvent | None = None
    hour: int = 0
    day: str = ""
    contribution: tuple[str, float | None] | None = None


@dataclass
class Located:
    """An event with where it sits on the topic and what it contributes to registered definitions."""

    event: TopicEvent
    partition: int = 0
    offset: int = 0
    contributions: list[tuple[str, str, float | None]] | None = None
    args: list[str | int] | None = None  # the encoded argument block, once `event_args` succeeded


@dataclass
class ProjectBatch:
    project_id: int
    tz: ZoneInfo
    events: list[Located]
    flags: dict[str, str] | None = None  # definition hash -> flags, for definitions in this batch
    generation: int = 0  # the project's definitions generation the contributions were planned with


class StaleDefinitions(Exception):
    """A project registered a definition after this batch was planned: plan again."""

    def __init__(self, project_ids: set[int]) -> None:
        super().__init__(f"definitions changed for projects {sorted(project_ids)}")
        self.project_ids = project_ids


class StateStore:
    """Redis-backed insight state for the dataflow."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._apply = client.register_script(scripts.APPLY_EVENTS.source)
        self._backfill = client.register_script(scripts.BACKFILL_EVENTS.source)

    def apply(self, batches: Iterable[ProjectBatch], chunk: int = 2000) -> Applied:
        """Apply each project's events (encoded by `event_args` into `Located.args`, or here)."""
        result = Applied()
        pipe = self.redis.pipeline(transaction=False)
        owners: list[int] = []
        for batch in batches:
            prefix = keys.project_prefix(batch.project_id)
            flags = orjson.dumps(batch.flags or {}).decode()
            for start in range(0, len(batch.events), chunk):
                part = batch.events[start:start + chunk]
                args: list[str | int] = [prefix, len(part), flags, batch.generation]
                for item in part:
                    assert item.args is not None, "events are encoded by `event_args` before they are applied"
                    args.extend(item.args)
                self._apply(keys=[keys.distinct_ids(batch.project_id)], args=args, client=pipe)
                owners.append(batch.project_id)
        stale: set[int] = set()
        for owner, answer in zip(owners, pipe.execute() if owners else [], strict=True):
            if int(answer[0]) < 0:
                stale.add(owner)
                continue
            result.events += int(answer[0])
            result.failed.update(_failures(owner, answer))
        if stale:
            raise StaleDefinitions(stale)
        return result

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
