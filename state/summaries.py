"""Per-person summaries in Redis: the dirty persons, their kept events, the summaries written per
day, and the per-day reads queries combine (kept decoded while each day's version stands, so a
dashboard that polls re-reads only the days that changed).

Both read caches are bounded by size (least recently used first out): `summary_cache_mb` of the
settings (`INSIGHTFLOW_SUMMARY_CACHE_MB`, default 1024) for the days, as much for combined ranges.
A person's kept events are its definition's records in its kept log (state/keys.py, `kept_log`), after
what an older layout kept in a string per definition. A summary write is refused when either grew
since they were read (their lengths add up to the version; a kept log never gets shorter), and the
person stays dirty for the next pass.

Merged persons (state/overrides.py): a survivor's summaries are made from the kept events of its
whole group (itself and everyone merged into it), and each member's own summaries are emptied. Each
merge makes its merged person dirty: the summariser marks the persons of the merge log's new entries
in the dirty sets (a cursor per definition), and until it has, queries count them as dirty too, so
an answer never depends on whether it did.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
import redis

from state import keys, scripts
from state.connection import ShardedStore, run_scripts, state_shards
from state.overrides import Overrides
from state.overrides import load as load_overrides
from state.records import definition_records, read_merge

Entry = tuple[str, str, bytes]  # (summary kind, day, value)
READ_SLICE = 1000  # persons whose kept logs one MGET reads


class Kept(NamedTuple):
    """A person's kept events of one definition as read: the records, the kept log they came from (to
    rewrite it), and the version a summary write checks."""

    records: bytes
    log: bytes
    version: int


class SummaryStore(ShardedStore):
    """The Redis edge of one project's summaries: what is dirty, what a person kept, what to write.
    Each person's are kept in its state shard (state/keys.py)."""

    def __init__(self, client: redis.Redis, shards: int | None = None) -> None:
        self.redis = client
        self._shards = shards
        self._write = client.register_script(scripts.WRITE_SUMMARIES.source)
        self._backfilled = client.register_script(scripts.BACKFILL_SUMMARIES.source)

    def _dirty_keys(self, project_id: int, h: str) -> list[str]:
        return keys.in_shards(keys.summary_dirty(keys.definition_prefix(project_id, h)), self.shards)

    def _in_shard(self, key: str, person: str | int) -> str:
        return keys.in_shard(key, keys.shard_of(person, self.shards))

    def overrides(self, project_id: int) -> Overrides:
        return load_overrides(self.redis, project_id)

    def _unmarked(self, project_id: int, h: str) -> tuple[int, list[str]]:
        """(the merge log's length, merged persons not marked dirty yet for the definition): the log's
        entries past the definition's cursor; every merged person while it has none."""
        cursor = self.redis.get(keys.merges_marked(keys.definition_prefix(project_id, h)))
        log = keys.merge_log(project_id)
        if cursor is None:
            length = int(self.redis.llen(log))  # first: a merge made meanwhile is then marked, maybe twice
            return length, [m.decode() for m in self.redis.hkeys(keys.merged(project_id))]
        entries = self.redis.lrange(log, int(cursor), -1)
        return int(cursor) + len(entries), [str(read_merge(e)[0]) for e in entries]

    def pending(self, project_id: int, h: str) -> int:
        dirty = sum(int(self.redis.scard(key)) for key in self._dirty_keys(project_id, h))
        cursor = self.redis.get(keys.merges_marked(keys.definition_prefix(project_id, h)))
        if cursor is None:
            return dirty + int(self.redis.hlen(keys.merged(project_id)))
        return dirty + max(0, int(self.redis.llen(keys.merge_log(project_id))) - int(cursor))

    def dirty(self, project_id: int, h: str, budget: int | None = None) -> list[str]:
        """Persons whose kept events changed since they were summarised (a random `budget` of them),
        and merged persons not marked yet."""
        found: list[bytes] = []
        for key in self._dirty_keys(project_id, h):
            share = None if budget is None else max(1, budget // self.shards)
            found += self.redis.smembers(key) if share is None else self.redis.srandmember(key, share)
        return list(dict.fromkeys([p.decode() for p in found] + self._unmarked(project_id, h)[1]))

    def mark_merges(self, project_id: int, h: str) -> None:
        """Mark the persons merged since the definition's cursor dirty, then move the cursor (marking
        twice is harmless, so two workers may both do it)."""
        length, persons = self._unmarked(project_id, h)
        prefix = keys.definition_prefix(project_id, h)
        if persons:
            pipe = self.redis.pipeline(transaction=False)
            for person in persons:
                pipe.sadd(self._in_shard(keys.summary_dirty(prefix), person), person)
            pipe.execute()
        self.redis.set(keys.merges_marked(prefix), length)

    def group_kept(self, project_id: int, h: str, persons: Iterable[str], overrides: Overrides
                   ) -> dict[str, dict[str, bytes]]:
        """The groups of these persons, by survivor: the survivor, then everyone merged into it, each
        with its kept events."""
        return {s: {m: kept.records for m, kept in group.items()}
                for s, group in self.kept_groups(project_id, h, persons, overrides, with_logs=False).items()}

    def kept_groups(self, project_id: int, h: str, persons: Iterable[str], overrides: Overrides,
                    with_logs: bool = True) -> dict[str, dict[str, Kept]]:
        """`group_kept` with each member's kept log and version, for the summariser."""
        survivors = dict.fromkeys(str(overrides.person(int(p))) for p in persons)
        groups = {s: [str(m) for m in overrides.group(int(s))] for s in survivors}
        members = list(dict.fromkeys(m for group in groups.values() for m in group))
        found = dict(zip(members, self.kept(project_id, h, members, with_logs), strict=True))
        return {s: {m: found[m] for m in group} for s, group in groups.items()}

    def kept_events(self, project_id: int, h: str, persons: list[str]) -> list[bytes]:
        return [kept.records for kept in self.kept(project_id, h, persons)]

    def kept(self, project_id: int, h: str, persons: list[str], with_logs: bool = True) -> list[Kept]:
        """Each person's kept events of definition h (without `with_logs`, `Kept.log` stays empty: a
        query needs only the records). `READ_SLICE` persons per `MGET`: a query meeting a backlog's
        dirty persons reads them all, and one reply of every log (1.2 GB at 5 M events) outlasted the
        client's socket timeout."""
        prefix = keys.definition_prefix(project_id, h)
        reads_older = self._reads_older(project_id, h)
        by_shard: dict[int, list[int]] = {}
        for i, person in enumerate(persons):
            by_shard.setdefault(keys.shard_of(person, self.shards), []).append(i)
        out: list[Kept] = [Kept(b"", b"", 0)] * len(persons)
        for shard, in_shard in by_shard.items():
            log_of = keys.kept_logs(project_id, shard)
            older_of = keys.in_shard(keys.person_events(prefix, ""), shard)
            for at in range(0, len(in_shard), READ_SLICE):
                indexes = in_shard[at:at + READ_SLICE]
                names = [log_of + persons[i] for i in indexes]
                if reads_older:
                    names += [older_of + persons[i] for i in indexes]
                raws, n = self.redis.mget(names), len(indexes)
                olders = raws[n:] if reads_older else [None] * n
                for i, log, older in zip(indexes, raws[:n], olders, strict=True):
                    log, older = log or b"", older or b""
                    out[i] = Kept(older + definition_records(log, h), log if with_logs else b"", len(log) + len(older))
        return out

    def _reads_older(self, project_id: int, h: str) -> bool:
        """Whether the definition is older than the kept logs, so its persons may still have a string
        of kept events of their own (state/registry.py marks every definition registered since)."""
        return self.redis.hget(keys.definition_meta(keys.definition_prefix(project_id, h)), "kept") != b"log"

    def irregular(self, project_id: int, h: str) -> list[str]:
        prefix = keys.definition_prefix(project_id, h)
        return [p.decode() for key in keys.in_shards(keys.irregular_persons(prefix), self.shards)
                for p in self.redis.hkeys(key)]

    def write(self, project_id: int, h: str,
              planned: list[tuple[str, int, bool, bytes | None, list[Entry]]], chunk: int = 500) -> set[str]:
        """Write (person, version read, irregular, replacement kept log or None, entries) each, in the
        person's state shard; a person whose kept events moved since is left dirty. Returns the
        persons written."""
        prefix = keys.definition_prefix(project_id, h)
        by_shard: dict[int, list[tuple[str, int, bool, bytes | None, list[Entry]]]] = {}
        for plan in planned:
            by_shard.setdefault(keys.shard_of(plan[0], self.shards), []).append(plan)
        calls = []
        for shard, plans in by_shard.items():
            shard_prefix = keys.in_shard(prefix, shard)
            log = keys.kept_logs(project_id, shard)
            for start in range(0, len(plans), chunk):
                args: list[str | int | bytes] = [shard_prefix, log, 0]
                for person, version, irregular, replacement, entries in plans[start:start + chunk]:
                    args += [person, version, int(irregular), int(replacement is not None), replacement or b"",
                             len(entries)]
                    for entry in entries:
                        args += entry
                    args[2] = int(args[2]) + 1
                calls.append(([keys.summary_dirty(shard_prefix)], args))
        return {p.decode() for result in run_scripts(self.redis, self._write, calls) for p in result}

    def write_backfilled(self, project_id: int, h: str, summarised: Any, sizes: dict[int, int], start: int = 0,
                         stop: int | None = None, chunk: int = 5000) -> int:
        """Write summaries a backfill computed over columns (`Summarised`, history_summaries.py) of
        its persons `start` to `stop` (indexes in `summarised.persons`), grouped by day
        (`backfill_summaries.lua`); `sizes`: the bytes of kept events the backfill gave each person,
        so a person whose kept events of the definition are not exactly those is left dirty. Returns
        how many persons were written."""
        prefix = keys.definition_prefix(project_id, h)
        persons, entry_persons = summarised.persons, summarised.entry_persons
        stop = len(persons) if stop is None else stop
        calls = []
        for shard in range(self.shards):
            shard_prefix = keys.in_shard(prefix, shard)
            mine = start + np.flatnonzero(persons[start:stop] % self.shards == shard)
            for at in range(0, len(mine), chunk):
                who = persons[mine[at:at + chunk]]
                first = int(np.searchsorted(entry_persons, who[0], side="left"))
                end = int(np.searchsorted(entry_persons, who[-1], side="right"))
                chosen = first + np.flatnonzero(entry_persons[first:end] % self.shards == shard)
                header: list[Any] = []
                for person, irregular in zip(who.tolist(), summarised.irregular[mine[at:at + chunk]].tolist(),
                                             strict=True):
                    header += [person, sizes[person], int(irregular)]
                days: dict[str, list[int]] = {}
                for i in chosen.tolist():
                    days.setdefault(summarised.entry_days[i], []).append(i)
                args: list[Any] = [shard_prefix, keys.kept_logs(project_id, shard), h, len(who), len(days), *header]
                for day, entries in days.items():
                    values = [summarised.values[i] for i in entries]
                    args += [summarised.kind, day, len(entries), int(all(values))]
                    for person, value in zip(entry_persons[entries].tolist(), values, strict=True):
                        args += [person, value]
                calls.append(([keys.summary_dirty(shard_prefix)], args))
        return sum(len(result) for result in run_scripts(self.redis, self._backfilled, calls))


def size_of(value: Any) -> int:
    """Bytes a decoded summary holds (arrays exactly; other objects roughly)."""
    if isinstance(value, np.ndarray):
        return value.nbytes if value.dtype != object else 64 * value.size
    if isinstance(value, tuple | list):
        return sum(size_of(v) for v in value) + 8 * len(value)
    return 64


class _Bounded:
    """A mapping that drops its least recently used entries beyond a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self._items: OrderedDict[Any, tuple[int, Any]] = OrderedDict()

    def get(self, key: Any) -> Any:
        found = self._items.get(key)
        if found is None:
            return None
        self._items.move_to_end(key)
        return found[1]

    def put(self, key: Any, value: Any) -> None:
        size = size_of(value)
        if key in self._items:
            self.used -= self._items.pop(key)[0]
        self._items[key] = (size, value)
        self.used += size
        while self.used > self.budget and len(self._items) > 1:
            self.used -= self._items.popitem(last=False)[1][0]


class DaySummaries:
    def __init__(self, budget_mb: int = 1024) -> None:
        self.configure(budget_mb)

    def configure(self, budget_mb: int) -> None:
        """Set the byte budget (the app does at start-up, from its settings); empties the caches."""
        self._days = _Bounded(budget_mb << 20)
        self._combined = _Bounded(budget_mb << 20)

    @staticmethod
    def _versions(client: redis.Redis, prefix: str, kind: str, days: list[str]) -> list[tuple[bytes | None, ...]]:
        """Each day's version in every state shard (None where a shard has none of that day)."""
        shards = state_shards(client)
        pipe = client.pipeline(transaction=False)
        for key in keys.in_shards(keys.summary_versions(prefix, kind), shards):
            pipe.hmget(key, days)
        per_shard = pipe.execute() if days else [[] for _ in range(shards)]
        return list(zip(*per_shard, strict=True)) if days else []

    def read_consistent(self, client: redis.Redis, definition: Any, days: list[str], read: Callable[[Any], Any],
                        kind: str | None = None, versions: list[tuple[bytes | None, ...]] | None = None) -> Any:
        """`read(versions)` (of the days' summaries, and whatever a summary write changes with them,
        such as the irregular persons) again while a write moved one of the days' versions
        meanwhile, so its parts come from one state (up to five tries). `versions`: the days'
        versions when the caller has just read them."""
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        kind = kind or definition.summary_kind
        if versions is None:
            versions = self._versions(client, prefix, kind, days)
        for _ in range(5):
            found = read(versions)
            again = self._versions(client, prefix, kind, days)
            if again == versions:
                return found
            versions = again
        return found

    def read_combined(self, client: redis.Redis, definition: Any, days: list[str],
                      decode: Callable[[list[bytes]], Any], combine: Callable[[list[Any]], Any],
                      kind: str | None = None) -> Any:
        """`combine` of the days' summaries, kept while none of the days changes (a polled range)."""
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        kind = kind or definition.summary_kind
        versions = self._versions(client, prefix, kind, days)
        key = (definition.project_id, definition.hash, kind, tuple(days), tuple(versions))
        value = self._combined.get(key)
        if value is None:
            value = combine(self.read(client, definition, days, decode, kind, versions))
            self._combined.put(key, value)
        return value

    def read(self, client: redis.Redis, definition: Any, days: list[str], decode: Callable[[list[bytes]], Any],
             kind: str | None = None, versions: list[tuple[bytes | None, ...]] | None = None) -> list[Any]:
        """The decoded summaries of the given days that have any (decode gets a day's hash values, of
        every state shard), from one consistent snapshot; `versions`: the days' versions when the
        caller has just read them."""
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        kind = kind or definition.summary_kind
        return self.read_consistent(
            client, definition, days, lambda now: self._read(client, definition, prefix, kind, days, now, decode),
            kind, versions)

    def _read(self, client: redis.Redis, definition: Any, prefix: str, kind: str, days: list[str],
              versions: list[tuple[bytes | None, ...]], decode: Callable[[list[bytes]], Any]) -> list[Any]:
        found, missing = [], []
        for day, version in zip(days, versions, strict=True):
            if all(v is None for v in version):
                continue
            cached = self._days.get((definition.project_id, definition.hash, kind, day))
            if cached is not None and cached[0] == version:
                found.append(cached[1])
            else:
                missing.append((day, version))
        if missing:
            shards = state_shards(client)
            pipe = client.pipeline(transaction=False)
            for day, _ in missing:
                for key in keys.in_shards(keys.summary_rows(prefix, kind, day), shards):
                    pipe.hvals(key)
            replies = iter(pipe.execute())
            for day, version in missing:
                values = [v for _ in range(shards) for v in next(replies)]
                decoded = decode(values)
                self._days.put((definition.project_id, definition.hash, kind, day), (version, decoded))
                found.append(decoded)
        return found


SUMMARIES = DaySummaries()
