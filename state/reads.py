"""What queries read from Redis: pipelined bulk reads named after the state they read, decoded.

The query classes in serving/ decide what to ask (which buckets, which series); this module knows
where it is kept and how it is encoded. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import redis

from state import keys
from state.connection import state_shards
from state.overrides import Overrides
from state.overrides import load as load_overrides
from state.records import read_first_seen, read_first_time

Bucket = str | int  # a project-zone day (YYYYMMDD) or hour start (epoch s)

# Redis numbers bitmap bits from the most significant bit of the first byte; reversing the bits of
# each byte and reading little-endian gives an integer whose bit i is person i, whatever its length.
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def read_bitmap(raw: bytes | None) -> int:
    """A stored person bitmap as an integer with bit i = person i."""
    return int.from_bytes((raw or b"").translate(_REVERSED), "little")


def person_bitmap(persons: Collection[int] | np.ndarray) -> bytes:
    """Persons as the stored bitmap `read_bitmap` reads (person p is bit 7 - p % 8 of byte p // 8): a
    backfill ORs a dense set in whole, where setting each person's bit costs about 1 µs of BITFIELD."""
    ids = np.fromiter(persons, dtype=np.int64, count=len(persons))
    bits = np.zeros(int(ids.max()) + 1, dtype=bool)
    bits[ids] = True
    return np.packbits(bits).tobytes()


@dataclass(frozen=True)
class Source:
    """Where a series' buckets live: the always-on state (names = event names) or a definition's
    state (names = breakdown values)."""

    hour_counts: Callable[[str], str]
    day_counts: Callable[[str], str]
    hour_persons: Callable[[str, int], str]
    day_persons: Callable[[str, str], str]
    prefix: str = ""
    of_first_times: bool = False  # each person counted in the bucket of its first event of a name

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
                   lambda n, d: keys.first_time_day_persons(pid, n, d), of_first_times=True)

    def persons(self, name: str, bucket: Bucket) -> str:
        """The person bitmap of a series in an hour (int) or a day (str)."""
        return self.hour_persons(name, bucket) if isinstance(bucket, int) else self.day_persons(name, bucket)


def _field(bucket: Bucket) -> str:
    """Property sums of an hour and of a day share a hash: fields `h<hour>` and `d<day>`."""
    return f"h{bucket}" if isinstance(bucket, int) else f"d{bucket}"


@dataclass
class FirstTimeFix:
    """What merges change in one event name's first-time state: a merged group counts once, in the
    bucket of its earliest first event, under its survivor (per bucket: count change, persons to
    clear, persons to set)."""

    counts: dict[Bucket, int]
    cleared: dict[Bucket, set[int]]
    set: dict[Bucket, set[int]]


class StateReader:
    """Bulk reads of one Redis: each method is one round trip. Event state spread over a project's
    state shards (state/keys.py) is read from every shard and combined here: counts add up, person
    sets are disjoint (a person is kept in one shard), values and kept events are concatenated.

    Given the project, persons merged into others are read as the person they became
    (state/overrides.py): person sets, counts per person, first times and first-time buckets."""

    def __init__(self, client: redis.Redis, project_id: int | None = None) -> None:
        self.redis = client
        self.shards = state_shards(client)
        self.project_id = project_id
        self._overrides: Overrides | None = None
        self._first_time_fixes: dict[str, FirstTimeFix] = {}

    @property
    def overrides(self) -> Overrides:
        if self._overrides is None:
            self._overrides = Overrides() if self.project_id is None else load_overrides(self.redis, self.project_id)
        return self._overrides

    def person(self, person: str) -> str:
        """The person `person` is now (itself unless it was merged into another)."""
        found = self.overrides.final.get(int(person))
        return person if found is None else str(found)

    def _each(self, key: str) -> list[str]:
        return keys.in_shards(key, self.shards)

    # --- the project ---------------------------------------------------------------------------
    def event_names(self, pid: int) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(keys.event_names(pid)))

    def events_counted(self, pid: int) -> int:
        """How many events the project's always-on state counted (its day counts, every name and shard)."""
        pipe = self.redis.pipeline(transaction=False)
        for name in self.event_names(pid):
            for key in self._each(keys.day_counts(pid, name)):
                pipe.hvals(key)
        return sum(int(v) for values in pipe.execute() for v in values)

    def earliest_ms(self, pid: int) -> int | None:
        """The earliest event time applied to the project (for `date_from=all`)."""
        raw = self.redis.hget(keys.project_meta(pid), "earliest_ms")
        return int(raw) if raw is not None else None

    def breakdown_values(self, prefix: str) -> list[str]:
        """Every breakdown value a definition has seen."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self._each(keys.definition_key(prefix, "bv")):
            pipe.smembers(key)
        return sorted({m.decode() for members in pipe.execute() for m in members})

    def persons(self, pid: int, persons: list[str]) -> list[tuple[list[str], dict[str, Any]]]:
        """Each person's distinct ids (sorted) and properties."""
        pipe = self.redis.pipeline(transaction=False)
        for person in persons:
            pipe.smembers(keys.person_distinct_ids(pid, person))
            pipe.hgetall(keys.person_properties(pid, person))
        replies = pipe.execute()
        return [(sorted(d.decode() for d in replies[2 * i]),
                 {k.decode(): orjson.loads(v) for k, v in replies[2 * i + 1].items()}) for i in range(len(persons))]

    def _first_seen_raw(self, pid: int, name: str, persons: list[int]) -> list[bytes | None]:
        key = keys.first_seen(pid, name)
        pipe = self.redis.pipeline(transaction=False)
        for person in persons:
            pipe.hget(keys.in_shard(key, keys.shard_of(person, self.shards)), person)
        return pipe.execute() if persons else []

    def first_seen(self, pid: int, name: str, persons: list[str]) -> list[int | None]:
        """Each person's first event time (ms) of that name, None if it has none (a survivor of
        merges: the earliest of everyone merged into it)."""
        groups = [self.overrides.group(int(p)) for p in persons]
        flat = [m for group in groups for m in group]
        raws = iter(self._first_seen_raw(pid, name, flat))
        out = []
        for group in groups:
            found = [read_first_seen(raw) for raw in (next(raws) for _ in group) if raw]
            out.append(min(found) if found else None)
        return out

    def first_time_fix(self, pid: int, name: str) -> FirstTimeFix:
        """How merges change the first-time state of `name` (nothing without merges)."""
        if name in self._first_time_fixes:
            return self._first_time_fixes[name]
        fix = FirstTimeFix({}, {}, {})
        groups = [(t, (t, *sources)) for t, sources in self.overrides.members.items()]
        flat = [m for _, group in groups for m in group]
        raws = iter(self._first_seen_raw(pid, name, flat))
        for survivor, group in groups:
            found = []
            for member in group:
                raw = next(raws)
                if raw:
                    found.append((*read_first_time(raw), member))
            if not found or (len(found) == 1 and found[0][3] == survivor):
                continue
            for _, hour, day, member in found:
                for bucket in (hour, day):
                    fix.counts[bucket] = fix.counts.get(bucket, 0) - 1
                    fix.cleared.setdefault(bucket, set()).add(member)
            _, hour, day, _ = min(found)
            for bucket in (hour, day):
                fix.counts[bucket] = fix.counts.get(bucket, 0) + 1
                fix.set.setdefault(bucket, set()).add(survivor)
        self._first_time_fixes[name] = fix
        return fix

    # --- series buckets ------------------------------------------------------------------------
    def counts(self, source: Source, names: list[str], days: list[str], hours: list[int]) -> list[dict[Bucket, int]]:
        """Per name, the stored count of each asked day and hour (0 where none), over every shard."""
        pipe = self.redis.pipeline(transaction=False)
        asked = []
        for name in names:
            for buckets, key in ((days, source.day_counts(name)), (hours, source.hour_counts(name))):
                if buckets:
                    for shard_key in self._each(key):
                        pipe.hmget(shard_key, buckets)
                        asked.append((name, buckets))
        out: dict[str, dict[Bucket, int]] = {name: {} for name in names}
        for (name, buckets), reply in zip(asked, pipe.execute() if asked else [], strict=True):
            found = out[name]
            for b, v in zip(buckets, reply, strict=True):
                found[b] = found.get(b, 0) + int(v or 0)
        if source.of_first_times and self.overrides and self.project_id is not None:
            for name in names:
                changes = self.first_time_fix(self.project_id, name).counts
                found = out[name]
                for b in found:
                    found[b] += changes.get(b, 0)
        return [out[name] for name in names]

    def bitcounts(self, person_keys: list[str | None]) -> list[int]:
        """Persons in each bitmap (None: no bitmap, 0), counted in Redis over every shard (with
        merges: read and counted here, each merged group once)."""
        if self.overrides:
            stored = self._person_sets([k for k in person_keys if k is not None])
            fixed = [k for k in stored if self._first_time(k) is not None]
            sets = self.bitmaps([[k] for k in fixed]) if fixed else {}
            return [0 if k is None else sets[k].bit_count() if k in sets else self.overrides.count(stored[k])
                    for k in person_keys]
        pipe = self.redis.pipeline(transaction=False)
        widths = []
        for key in person_keys:
            each = self._each(key) if key is not None else []
            widths.append(len(each))
            for shard_key in each:
                pipe.bitcount(shard_key)
        replies = iter(pipe.execute() if any(widths) else [])
        return [sum(int(next(replies)) for _ in range(width)) for width in widths]

    def _person_sets(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Each person bitmap named once, as stored (Redis bit order), every shard's persons in one."""
        unique = list(dict.fromkeys(names))
        pipe = self.redis.pipeline(transaction=False)
        for key in unique:
            for shard_key in self._each(key):
                pipe.get(shard_key)
        replies = iter(pipe.execute() if unique else [])
        out = {}
        for key in unique:
            parts = [np.frombuffer(next(replies) or b"", dtype=np.uint8) for _ in range(self.shards)]
            if len(parts) == 1:
                out[key] = parts[0]
                continue
            combined = np.zeros(max(len(p) for p in parts), dtype=np.uint8)
            for part in parts:
                combined[:len(part)] |= part
            out[key] = combined
        return out

    def bitmaps(self, key_lists: Iterable[Iterable[str]]) -> dict[str, int]:
        """Each person bitmap named once, as an integer with bit i = person i (every shard's persons;
        merged persons as their survivors)."""
        stored = self._person_sets(k for members in key_lists for k in members)
        if not self.overrides:
            return {key: read_bitmap(raw.tobytes()) for key, raw in stored.items()}
        out = {}
        for key, raw in stored.items():
            first_time = self._first_time(key)
            if first_time is None:
                out[key] = read_bitmap(self.overrides.person_set(raw).tobytes())
            else:  # the group's members leave their buckets, the survivor joins the earliest one
                out[key] = self._first_time_set(read_bitmap(raw.tobytes()), *first_time)
        return out

    def _first_time(self, key: str) -> tuple[str, Bucket] | None:
        return keys.first_time_persons_bucket(self.project_id, key) if self.project_id is not None else None

    def _first_time_set(self, value: int, name: str, bucket: Bucket) -> int:
        """A first-time person set with each merged group in the bucket of its earliest first event,
        under its survivor (every member with a first time of `name` leaves its own bucket)."""
        fix = self.first_time_fix(self.project_id, name)  # type: ignore[arg-type]
        for person in fix.cleared.get(bucket, ()):
            value &= ~(1 << person)
        for person in fix.set.get(bucket, ()):
            value |= 1 << person
        return value

    # --- a definition's property values and events per person ----------------------------------------
    def value_stats(self, prefix: str, names: list[str], groups: list[list[Bucket]]
                    ) -> list[list[list[tuple[float, int, float, float]]]]:
        """Per name and group of buckets: (sum, count, min, max) of the property in each bucket and
        shard of the group that has values (the caller adds them up, in this order)."""
        pipe = self.redis.pipeline(transaction=False)
        width = 0
        for name in names:
            for group in groups:
                fields = [f"{_field(b)}:{x}" for b in group for x in ("s", "n", "min", "max")]
                each = self._each(keys.definition_key(prefix, "vs", name))
                width = len(each)
                for key in each:
                    pipe.hmget(key, fields)
        replies = iter(pipe.execute() if names and groups else [])
        out = []
        for _name in names:
            per_group = []
            for _group in groups:
                found = []
                for _ in range(width):
                    reply = next(replies)
                    found += [(float(reply[j]), int(reply[j + 1]), float(reply[j + 2]), float(reply[j + 3]))
                              for j in range(0, len(reply), 4) if reply[j + 1] is not None]
                per_group.append(found)
            out.append(per_group)
        return out

    def values(self, prefix: str, names: list[str], groups: list[list[Bucket]]) -> list[list[float]]:
        """Per group of buckets: every property value kept, over all names and shards."""
        pipe = self.redis.pipeline(transaction=False)
        counts = []
        for group in groups:
            n = 0
            for name in names:
                for b in group:
                    for key in self._each(keys.definition_key(prefix, "vlh" if isinstance(b, int) else "vl", name, b)):
                        pipe.lrange(key, 0, -1)
                        n += 1
            counts.append(n)
        replies = iter(pipe.execute() if any(counts) else [])
        out = []
        for n in counts:
            found: list[float] = []
            for _ in range(n):
                found += [float(v) for v in next(replies)]
            out.append(found)
        return out

    def events_per_person(self, prefix: str, names: list[str], groups: list[list[Bucket]]) -> list[dict[int, int]]:
        """Per group of buckets: each person's events, over all names (and the person's shard)."""
        pipe = self.redis.pipeline(transaction=False)
        sizes = []
        for group in groups:
            n = 0
            for name in names:
                for b in group:
                    for key in self._each(keys.definition_key(prefix, "pah" if isinstance(b, int) else "pa", name, b)):
                        pipe.hgetall(key)
                        n += 1
            sizes.append(n)
        replies = iter(pipe.execute() if any(sizes) else [])
        out = []
        for n in sizes:
            counts: dict[int, int] = {}
            for _ in range(n):
                for person, count in next(replies).items():
                    counts[int(person)] = counts.get(int(person), 0) + int(count)
            out.append(self.overrides.per_person(counts))
        return out

    def day_events(self, prefix: str, days: list[str]) -> list[bytes]:
        """The events a funnel definition keeps for those days, from every shard (state/records.py
        decodes them)."""
        pipe = self.redis.pipeline(transaction=False)
        for day in days:
            for key in self._each(keys.definition_events(prefix, day)):
                pipe.lrange(key, 0, -1)
        return [raw for entries in (pipe.execute() if days else []) for raw in entries]
