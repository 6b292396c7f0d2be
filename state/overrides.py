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

    def bitmap(self, value: int) -> int:
        """A person set (bit i = person i) with each merged person's bit moved to its survivor."""
        if not self.final or not value:
            return value
        raw = value.to_bytes((value.bit_length() + 7) // 8, "little")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        sources, targets = self._arrays
        inside = sources < len(bits)
        sources, targets = sources[inside], targets[inside]
        present = bits[sources].astype(bool)
        if not present.any():
            return value
        moved = targets[present]
        size = max(len(bits), int(moved.max()) + 1)
        if size > len(bits):
            bits = np.concatenate([bits, np.zeros(-(-size // 8) * 8 - len(bits), dtype=np.uint8)])
        bits[sources[present]] = 0
        bits[moved] = 1
        return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")

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
