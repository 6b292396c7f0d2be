"""Per-day summaries (dataflows/summaries.py) as queries read them, kept decoded in the API process
while each day's version stands: a dashboard that polls re-reads only the days that changed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from schemas import keys


class DaySummaries:
    def __init__(self, capacity: int = 4096, combined: int = 8) -> None:
        self.capacity, self.combined = capacity, combined
        self._days: dict[tuple[int, str, str, str], tuple[int, Any]] = {}
        self._combined: dict[tuple[Any, ...], Any] = {}

    def read_combined(self, client: redis.Redis, definition: Any, days: list[str],
                      decode: Callable[[list[bytes]], Any], combine: Callable[[list[Any]], Any],
                      kind: str | None = None) -> Any:
        """`combine` of the days' summaries, kept while none of the days changes (a polled range)."""
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        kind = kind or definition.summary_kind
        versions = client.hmget(keys.summary_versions(prefix, kind), days)
        key = (definition.project_id, definition.hash, kind, tuple(days), tuple(versions))
        if key in self._combined:
            return self._combined[key]
        value = combine(self.read(client, definition, days, decode, kind))
        if len(self._combined) >= self.combined:
            self._combined.pop(next(iter(self._combined)))
        self._combined[key] = value
        return value

    def read(self, client: redis.Redis, definition: Any, days: list[str],
             decode: Callable[[list[bytes]], Any], kind: str | None = None) -> list[Any]:
        """The decoded summaries of the given days that have any (decode gets a day's hash values)."""
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        kind = kind or definition.summary_kind
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
                if len(self._days) >= self.capacity:
                    self._days.pop(next(iter(self._days)))
                self._days[(definition.project_id, definition.hash, kind, day)] = (version, decoded)
                found.append(decoded)
        return found


SUMMARIES = DaySummaries()
