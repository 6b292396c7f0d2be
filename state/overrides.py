"""Merged persons as queries see them: every person merged into another is that other person.

Events keep the person they were applied under: a merge can reach Redis after events of the merged
person (another partition, a replay, a worker that had not heard of it yet). So a query folds each
merged person into the person it became, from the merges recorded (`pmerged`, written by
`persons.lua`): person sets move its bit to the survivor, counts per person add up, first times
take the earliest of the group. The answer then depends only on which merges happened, not on the
order merges and events arrived in, and its cost grows with the merged persons, not all persons.
Summaries (funnels, paths) are rebuilt for the whole group by the summariser (state/summaries.py).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any

import numpy as np

from state import keys
from state.connection import pipeline
from state.records import read_merge


def final_person(merged: dict[int, int], person: int) -> int:
    """The person `person` is now, following merges of merges."""
    seen = {person}
    while person in merged and merged[person] not in seen:
        person = merged[person]
        seen.add(person)
    return person


def _members_of(raw: np.ndarray, persons: np.ndarray) -> np.ndarray:
    """Which of `persons` a stored person set holds (Redis bit order: person i is bit 7 - i % 8 of
    byte i // 8; persons past its end are not in it)."""
    found = np.zeros(len(persons), dtype=bool)
    inside = persons < len(raw) * 8
    kept = persons[inside]
    found[inside] = (raw[kept >> 3] >> (7 - (kept & 7)) & 1).astype(bool)
    return found


class Overrides:
    """The merges of one project: merged person -> the person it is now (chains followed), and each
    survivor's merged persons. Kept up to date merge by merge, in the order Redis made them."""

    def __init__(self, final: dict[int, int] | None = None) -> None:
        self.final: dict[int, int] = {}
        self._members: dict[int, list[int]] = defaultdict(list)
        self._arrays_cache: tuple[np.ndarray, np.ndarray] | None = None
        for source, target in (final or {}).items():
            self.final[source] = target
            self._members[target].append(source)

    @classmethod
    def from_merges(cls, merged: dict[int, int]) -> Overrides:
        return cls({p: final_person(merged, p) for p in merged})

    def merge(self, source: int, target: int) -> None:
        """`source` (and everyone merged into it) became `target`."""
        survivor = self.final.get(target, target)
        if survivor == source or source in self.final:
            return
        moved = [source, *self._members.pop(source, ())]
        for person in moved:
            self.final[person] = survivor
        self._members[survivor].extend(moved)
        self._arrays_cache = None

    def __bool__(self) -> bool:
        return bool(self.final)

    def person(self, person: int) -> int:
        return self.final.get(person, person)

    @property
    def members(self) -> dict[int, list[int]]:
        """Survivor -> the persons merged into it (not itself)."""
        return self._members

    def group(self, person: int) -> tuple[int, ...]:
        """The person this one is now, first, then every person merged into it."""
        survivor = self.person(person)
        return (survivor, *sorted(self._members.get(survivor, ())))

    @property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays_cache is None:
            sources = np.fromiter(self.final, dtype=np.int64, count=len(self.final))
            targets = np.fromiter(self.final.values(), dtype=np.int64, count=len(self.final))
            self._arrays_cache = (sources, targets)
        return self._arrays_cache

    def _present(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(merged persons set in a stored person set, their survivors)."""
        sources, targets = self._arrays
        present = _members_of(raw, sources)
        return sources[present], targets[present]

    def person_set(self, raw: np.ndarray) -> np.ndarray:
        """A stored person set with each merged person's bit moved to its survivor."""
        if not self.final:
            return raw
        sources, targets = self._present(raw)
        if not len(sources):
            return raw
        size = max(len(raw), (int(targets.max()) >> 3) + 1)
        out = np.zeros(size, dtype=np.uint8)
        out[:len(raw)] = raw
        np.bitwise_and.at(out, sources >> 3, ~(np.uint8(1) << (7 - (sources & 7)).astype(np.uint8)))
        np.bitwise_or.at(out, targets >> 3, (np.uint8(1) << (7 - (targets & 7)).astype(np.uint8)))
        return out

    def count(self, raw: np.ndarray) -> int:
        """Persons in a stored person set, each group of merged persons counted once."""
        total = int.from_bytes(raw.tobytes(), "big").bit_count()
        if not self.final or not total:
            return total
        sources, targets = self._present(raw)
        already = _members_of(raw, targets)
        return total - len(sources) + len(set(targets[~already].tolist()))

    def per_person(self, counts: dict[int, int]) -> dict[int, int]:
        """Counts per person with each merged person's added to its survivor's."""
        if not self.final:
            return counts
        out: dict[int, int] = {}
        for person, count in counts.items():
            survivor = self.final.get(person, person)
            out[survivor] = out.get(survivor, 0) + count
        return out


_cache: weakref.WeakKeyDictionary[Any, dict[int, tuple[int, Overrides]]] = weakref.WeakKeyDictionary()


def load(client: Any, project_id: int) -> Overrides:
    """The project's merges, kept per client: each call reads the merge log (`pmlog`, appended by
    `persons.lua` in the order merges are made) from where it stopped and applies only the merges
    added since. State older than the log (merges recorded in `pmerged` alone) is read whole once."""
    known = _cache.setdefault(client, {})
    log = keys.merge_log(project_id)
    found = known.get(project_id)
    if found is None:
        found = (0, Overrides())
        if int(client.hlen(keys.merged(project_id))) > int(client.llen(log)):  # merges older than the log
            pipe = pipeline(client)  # the merges and the log's length as of one moment
            pipe.hgetall(keys.merged(project_id))
            pipe.llen(log)
            everything, logged = pipe.execute()
            found = (int(logged), Overrides.from_merges({int(s): int(t) for s, t in everything.items()}))
    read, overrides = found
    for entry in client.lrange(log, read, -1):
        overrides.merge(*read_merge(entry))
        read += 1
    known[project_id] = (read, overrides)
    return overrides
