"""Merged persons as queries see them: every person merged into another is that other person.

Events keep the person they were applied under: a merge can reach Redis after events of the merged
person (another partition, a replay, a worker that had not heard of it yet). So a query folds each
merged person into the person it became, from the merges recorded (`pmerged`, written by
`persons.lua`): person sets move its bit to the survivor, counts per person add up, first times
take the earliest of the group. The answer then depends only on which merges happened, not on the
order merges and events arrived in, and its cost grows with the merged persons, not all persons.
Summaries (funnels, paths) are folded by the summariser instead (state/summaries.py).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from state import keys


def final_person(merged: dict[int, int], person: int) -> int:
    """The person `person` is now, following merges of merges."""
    seen = {person}
    while person in merged and merged[person] not in seen:
        person = merged[person]
        seen.add(person)
    return person


@dataclass(frozen=True)
class Overrides:
    """The merges of one project: merged person -> the person it is now (chains followed)."""

    final: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_merges(cls, merged: dict[int, int]) -> Overrides:
        return cls({p: final_person(merged, p) for p in merged})

    def __bool__(self) -> bool:
        return bool(self.final)

    def person(self, person: int) -> int:
        return self.final.get(person, person)

    @cached_property
    def members(self) -> dict[int, tuple[int, ...]]:
        """Survivor -> the persons merged into it (not itself)."""
        out: dict[int, list[int]] = defaultdict(list)
        for source, target in self.final.items():
            out[target].append(source)
        return {t: tuple(sorted(s)) for t, s in out.items()}

    def group(self, person: int) -> tuple[int, ...]:
        """The person this one is now, first, then every person merged into it."""
        survivor = self.person(person)
        return (survivor, *self.members.get(survivor, ()))

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        sources = np.array(sorted(self.final), dtype=np.int64)
        return sources, np.array([self.final[s] for s in sources.tolist()], dtype=np.int64)

    def _present(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(merged persons set in a stored person set, their survivors)."""
        sources, targets = self._arrays
        inside = sources < len(raw) * 8
        sources, targets = sources[inside], targets[inside]
        present = (raw[sources >> 3] >> (7 - (sources & 7)) & 1).astype(bool)
        return sources[present], targets[present]

    def person_set(self, raw: np.ndarray) -> np.ndarray:
        """A stored person set (Redis bit order: person i is bit 7 - i % 8 of byte i // 8) with each
        merged person's bit moved to its survivor."""
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
        inside = targets < len(raw) * 8
        already = np.zeros(len(targets), dtype=bool)
        kept = targets[inside]
        already[inside] = (raw[kept >> 3] >> (7 - (kept & 7)) & 1).astype(bool)
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
    """The project's merges. Merges are only ever added, so the decoded map is kept per client and
    read again only when their number grew (one HLEN per query otherwise)."""
    known = _cache.setdefault(client, {})
    key = keys.merged(project_id)
    size = int(client.hlen(key))
    found = known.get(project_id)
    if found is not None and found[0] == size:
        return found[1]
    merged = {int(s): int(t) for s, t in client.hgetall(key).items()}
    overrides = Overrides.from_merges(merged)
    known[project_id] = (len(merged), overrides)
    return overrides
