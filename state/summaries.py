"""Per-person summaries in Redis: the dirty persons, their kept events, the summaries written per
day, and the per-day reads queries combine (kept decoded while each day's version stands, so a
dashboard that polls re-reads only the days that changed).

Both read caches are bounded by size (least recently used first out): `summary_cache_mb` of the
settings (`INSIGHTFLOW_SUMMARY_CACHE_MB`, default 1024) for the days, as much for combined ranges.
A summary write is refused when the person's kept events grew since they were read (their length is
the version), and the person stays dirty for the next pass.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import redis

from state import keys, scripts

Entry = tuple[str, str, bytes]  # (summary kind, day, value)


class SummaryStore:
    """The Redis edge of one project's summaries: what is dirty, what a person kept, what to write."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._write = client.register_script(scripts.WRITE_SUMMARIES.source)

    def pending(self, project_id: int, h: str) -> int:
        return int(self.redis.scard(keys.summary_dirty(keys.definition_prefix(project_id, h))))

    def dirty(self, project_id: int, h: str, budget: int | None = None) -> list[str]:
        """Persons whose kept events changed since they were summarised (a random `budget` of them)."""
        key = keys.summary_dirty(keys.definition_prefix(project_id, h))
        found = self.redis.smembers(key) if budget is None else self.redis.srandmember(key, budget)
        return [p.decode() for p in found]

    def kept_events(self, project_id: int, h: str, persons: list[str]) -> list[bytes]:
        prefix = keys.definition_prefix(project_id, h)
        return [raw or b"" for raw in self.redis.mget([keys.person_events(prefix, p) for p in persons])] \
            if persons else []

    def irregular(self, project_id: int, h: str) -> list[str]:
        return [p.decode() for p in self.redis.hkeys(keys.irregular_persons(keys.definition_prefix(project_id, h)))]

    def write(self, project_id: int, h: str,
              planned: list[tuple[str, int, bool, bytes | None, list[Entry]]], chunk: int = 500) -> int:
        """Write (person, version read, irregular, replacement kept events or None, entries) each; a
        person whose kept events moved since is left dirty. Returns how many were written."""
        prefix = keys.definition_prefix(project_id, h)
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(planned), chunk):
            args: list[str | int | bytes] = [prefix, 0]
            for person, version, irregular, replacement, entries in planned[start:start + chunk]:
                args += [person, version, int(irregular), int(replacement is not None), replacement or b"",
                         len(entries)]
                for entry in entries:
                    args += entry
                args[1] = int(args[1]) + 1
            self._write(keys=[keys.summary_dirty(prefix)], args=args, client=pipe)
        return sum(int(result) for result in pipe.execute()) if planned else 0


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

    def read_combined(self, client: redis.Redis, definition: Any, days: list[str],
                      decode: Callable[[list[bytes]], Any], combine: Callable[[list[Any]], Any],
                      kind: str | None = None) -> Any:
        """`combine` of the days' summaries, kept while none of the days changes (a polled range)."""
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        kind = kind or definition.summary_kind
        versions = client.hmget(keys.summary_versions(prefix, kind), days)
        key = (definition.project_id, definition.hash, kind, tuple(days), tuple(versions))
        value = self._combined.get(key)
        if value is None:
            value = combine(self.read(client, definition, days, decode, kind, versions))
            self._combined.put(key, value)
        return value

    def read(self, client: redis.Redis, definition: Any, days: list[str], decode: Callable[[list[bytes]], Any],
             kind: str | None = None, versions: list[bytes | None] | None = None) -> list[Any]:
        """The decoded summaries of the given days that have any (decode gets a day's hash values);
        `versions`: the days' versions when the caller has just read them."""
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        kind = kind or definition.summary_kind
        if versions is None:
            versions = client.hmget(keys.summary_versions(prefix, kind), days)
        for _ in range(5):
            found = self._read(client, definition, prefix, kind, days, versions, decode)
            again = client.hmget(keys.summary_versions(prefix, kind), days)
            if again == versions:  # no day changed while reading: one consistent snapshot
                return found
            versions = again
        return found

    def _read(self, client: redis.Redis, definition: Any, prefix: str, kind: str, days: list[str],
              versions: list[bytes | None], decode: Callable[[list[bytes]], Any]) -> list[Any]:
        found, missing = [], []
        for day, version in zip(days, versions, strict=True):
            if version is None:
                continue
            cached = self._days.get((definition.project_id, definition.hash, kind, day))
            if cached is not None and cached[0] == int(version):
                found.append(cached[1])
            else:
                missing.append((day, int(version)))
        if missing:
            pipe = client.pipeline(transaction=False)
            for day, _ in missing:
                pipe.hvals(keys.summary_rows(prefix, kind, day))
            for (day, version), values in zip(missing, pipe.execute(), strict=True):
                decoded = decode(values)
                self._days.put((definition.project_id, definition.hash, kind, day), (version, decoded))
                found.append(decoded)
        return found


SUMMARIES = DaySummaries()
