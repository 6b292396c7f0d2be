"""What queries read from Redis: pipelined bulk reads named after the state they read, decoded.

The query classes in serving/ decide what to ask (which buckets, which series); this module knows
where it is kept and how it is encoded. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from state import keys
from state.records import read_first_seen

Bucket = str | int  # a project-zone day (YYYYMMDD) or hour start (epoch s)

# Redis numbers bitmap bits from the most significant bit of the first byte; reversing the bits of
# each byte and reading little-endian gives an integer whose bit i is person i, whatever its length.
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def read_bitmap(raw: bytes | None) -> int:
    """A stored person bitmap as an integer with bit i = person i."""
    return int.from_bytes((raw or b"").translate(_REVERSED), "little")


@dataclass(frozen=True)
class Source:
    """Where a series' buckets live: the always-on state (names = event names) or a definition's
    state (names = breakdown values)."""

    hour_counts: Callable[[str], str]
    day_counts: Callable[[str], str]
    hour_persons: Callable[[str, int], str]
    day_persons: Callable[[str, str], str]
    prefix: str = ""

    @classmethod
    def always_on(cls, pid: int) -> Source:
        return cls(lambda n: keys.hour_counts(pid, n), lambda n: keys.day_counts(pid, n),
                   lambda n, h: keys.hour_persons(pid, n, h), lambda n, d: keys.day_persons(pid, n, d))

    @classmethod
    def definition(cls, pid: int, h: str) -> Source:
        p = keys.definition_prefix(pid, h)
        key = keys.definition_key
        return cls(lambda n: key(p, "ch", n), lambda n: key(p, "cd", n), lambda n, hr: key(p, "uh", n, hr),
                   lambda n, d: key(p, "ud", n, d), p)

    @classmethod
    def first_times(cls, pid: int) -> Source:
        """Persons and counts by the bucket of each person's first event of a name."""
        return cls(lambda n: keys.first_time_hour_counts(pid, n), lambda n: keys.first_time_day_counts(pid, n),
                   lambda n, h: keys.first_time_hour_persons(pid, n, h),
                   lambda n, d: keys.first_time_day_persons(pid, n, d))

    def persons(self, name: str, bucket: Bucket) -> str:
        """The person bitmap of a series in an hour (int) or a day (str)."""
        return self.hour_persons(name, bucket) if isinstance(bucket, int) else self.day_persons(name, bucket)


def _field(bucket: Bucket) -> str:
    """Property sums of an hour and of a day share a hash: fields `h<hour>` and `d<day>`."""
    return f"h{bucket}" if isinstance(bucket, int) else f"d{bucket}"


class StateReader:
    """Bulk reads of one Redis: each method is one round trip."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    # --- the project ---------------------------------------------------------------------------
    def event_names(self, pid: int) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(keys.event_names(pid)))

    def earliest_ms(self, pid: int) -> int | None:
        """The earliest event time applied to the project (for `date_from=all`)."""
        raw = self.redis.hget(keys.project_meta(pid), "earliest_ms")
        return int(raw) if raw is not None else None

    def breakdown_values(self, prefix: str) -> list[str]:
        """Every breakdown value a definition has seen."""
        return sorted(m.decode() for m in self.redis.smembers(keys.definition_key(prefix, "bv")))

    def persons(self, pid: int, persons: list[str]) -> list[tuple[list[str], dict[str, Any]]]:
        """Each person's distinct ids (sorted) and properties."""
        pipe = self.redis.pipeline(transaction=False)
        for person in persons:
            pipe.smembers(keys.person_distinct_ids(pid, person))
            pipe.hgetall(keys.person_properties(pid, person))
        replies = pipe.execute()
        return [(sorted(d.decode() for d in replies[2 * i]),
                 {k.decode(): orjson.loads(v) for k, v in replies[2 * i + 1].items()}) for i in range(len(persons))]

    def first_seen(self, pid: int, name: str, persons: list[str]) -> list[int | None]:
        """Each person's first event time (ms) of that name, None if it has none."""
        if not persons:
            return []
        return [read_first_seen(raw) if raw else None for raw in self.redis.hmget(keys.first_seen(pid, name), persons)]

    # --- series buckets ------------------------------------------------------------------------
    def counts(self, source: Source, names: list[str], days: list[str], hours: list[int]) -> list[dict[Bucket, int]]:
        """Per name, the stored count of each asked day and hour (0 where none)."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            if days:
                pipe.hmget(source.day_counts(name), days)
            if hours:
                pipe.hmget(source.hour_counts(name), hours)
        replies = iter(pipe.execute() if names and (days or hours) else [])
        out: list[dict[Bucket, int]] = []
        for _name in names:
            found: dict[Bucket, int] = {}
            if days:
                found.update((d, int(v or 0)) for d, v in zip(days, next(replies), strict=True))
            if hours:
                found.update((h, int(v or 0)) for h, v in zip(hours, next(replies), strict=True))
            out.append(found)
        return out

    def bitcounts(self, person_keys: list[str | None]) -> list[int]:
        """Persons in each bitmap (None: no bitmap, 0), counted in Redis."""
        pipe = self.redis.pipeline(transaction=False)
        for key in person_keys:
            if key is None:
                pipe.echo("0")
            else:
                pipe.bitcount(key)
        return [int(v) for v in pipe.execute()] if person_keys else []

    def bitmaps(self, key_lists: Iterable[Iterable[str]]) -> dict[str, int]:
        """Each person bitmap named once, as an integer with bit i = person i."""
        unique = list(dict.fromkeys(k for members in key_lists for k in members))
        pipe = self.redis.pipeline(transaction=False)
        for key in unique:
            pipe.get(key)
        return {k: read_bitmap(v) for k, v in zip(unique, pipe.execute() if unique else [], strict=True)}

    # --- a definition's property values and events per person ----------------------------------------
    def value_stats(self, prefix: str, names: list[str], groups: list[list[Bucket]]
                    ) -> list[list[list[tuple[float, int, float, float]]]]:
        """Per name and group of buckets: (sum, count, min, max) of the property in each bucket of the
        group that has values (the caller adds them up, in this order)."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            for group in groups:
                fields = [f"{_field(b)}:{x}" for b in group for x in ("s", "n", "min", "max")]
                pipe.hmget(keys.definition_key(prefix, "vs", name), fields)
        replies = iter(pipe.execute() if names and groups else [])
        out = []
        for _name in names:
            per_group = []
            for _group in groups:
                reply = next(replies)
                per_group.append([(float(reply[j]), int(reply[j + 1]), float(reply[j + 2]), float(reply[j + 3]))
                                  for j in range(0, len(reply), 4) if reply[j + 1] is not None])
            out.append(per_group)
        return out

    def values(self, prefix: str, names: list[str], groups: list[list[Bucket]]) -> list[list[float]]:
        """Per group of buckets: every property value kept, over all names."""
        pipe = self.redis.pipeline(transaction=False)
        for group in groups:
            for name in names:
                for b in group:
                    pipe.lrange(keys.definition_key(prefix, "vlh" if isinstance(b, int) else "vl", name, b), 0, -1)
        replies = iter(pipe.execute() if names and groups else [])
        out = []
        for group in groups:
            found: list[float] = []
            for _ in range(len(names) * len(group)):
                found += [float(v) for v in next(replies)]
            out.append(found)
        return out

    def events_per_person(self, prefix: str, names: list[str], groups: list[list[Bucket]]) -> list[dict[int, int]]:
        """Per group of buckets: each person's events, over all names."""
        pipe = self.redis.pipeline(transaction=False)
        for group in groups:
            for name in names:
                for b in group:
                    pipe.hgetall(keys.definition_key(prefix, "pah" if isinstance(b, int) else "pa", name, b))
        replies = iter(pipe.execute() if names and groups else [])
        out = []
        for group in groups:
            counts: dict[int, int] = {}
            for _ in range(len(names) * len(group)):
                for person, count in next(replies).items():
                    counts[int(person)] = counts.get(int(person), 0) + int(count)
            out.append(counts)
        return out

    def day_events(self, prefix: str, days: list[str]) -> list[bytes]:
        """The events a funnel definition keeps for those days (state/records.py decodes them)."""
        pipe = self.redis.pipeline(transaction=False)
        for day in days:
            pipe.lrange(keys.definition_events(prefix, day), 0, -1)
        return [raw for entries in (pipe.execute() if days else []) for raw in entries]
