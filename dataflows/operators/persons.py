"""Person resolution: what an event says about identity and person properties (no I/O).

The store applies the result atomically per project (`state/store.py`), so two workers that
see distinct ids of one person on different partitions still agree on one person.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from schemas.events import TopicEvent

LinkKind = Literal["identify", "alias", "merge"]


@dataclass(frozen=True, slots=True)
class PersonUpdate:
    """Identity link (if any) and property changes one event carries."""

    link_kind: LinkKind | None
    other_distinct_id: str | None
    set: dict[str, Any]
    set_once: dict[str, Any]
    unset: list[str]


@dataclass(slots=True)
class PersonProperties:
    """A person's properties and when each last changed (`stamps`: key -> (kind, ts_ms), kind `s`
    $set, `o` $set_once, `u` unset), so updates leave what applying them in event-time order
    does, whatever order they come in and however often: the rule `apply_props` keeps in Redis
    (state/lua/persons.lua). A resent or replayed old `$set` then changes nothing here either."""

    values: dict[str, Any]
    stamps: dict[str, tuple[str, int]]

    def apply(self, update: PersonUpdate, ts: int) -> None:
        values, stamps = self.values, self.stamps
        for k, v in update.set.items():
            kind, t = stamps.get(k, ("", 0))
            if not kind or kind == "o" or t <= ts:
                values[k] = v
                stamps[k] = ("s", ts)
        for k, v in update.set_once.items():
            kind, t = stamps.get(k, ("", 0))
            if not kind or (kind == "o" and ts < t) or (kind == "u" and ts > t):
                values[k] = v
                stamps[k] = ("o", ts)
        for k in update.unset:
            kind, t = stamps.get(k, ("", 0))
            if not kind or kind == "o" or t <= ts:
                values.pop(k, None)
                stamps[k] = ("u", ts)


NO_UPDATE = PersonUpdate(None, None, {}, {}, [])  # shared: nothing reads an update to change it
LINKING = ("$identify", "$create_alias", "$merge_dangerously")


def _other_id(value: Any, own: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    return text if text and text != own else None


def person_update(event: TopicEvent) -> PersonUpdate:
    """`$identify` links `$anon_distinct_id`; `$create_alias`/`$merge_dangerously` link `alias`.

    `$identify` and `$create_alias` never merge two persons that are both already identified
    (PostHog refuses); `$merge_dangerously` always merges.
    """
    props = event.properties
    if event.event not in LINKING and "$set" not in props and "$set_once" not in props and "$unset" not in props:
        return NO_UPDATE  # most events
    link_kind: LinkKind | None = None
    other: str | None = None
    if event.event == "$identify":
        other = _other_id(props.get("$anon_distinct_id"), event.distinct_id)
        link_kind = "identify" if other else None
    elif event.event in ("$create_alias", "$merge_dangerously"):
        other = _other_id(props.get("alias"), event.distinct_id)
        if other:
            link_kind = "alias" if event.event == "$create_alias" else "merge"
    set_ = props.get("$set") if isinstance(props.get("$set"), dict) else {}
    set_once = props.get("$set_once") if isinstance(props.get("$set_once"), dict) else {}
    raw_unset = props.get("$unset")
    unset = [str(k) for k in (raw_unset.keys() if isinstance(raw_unset, dict) else raw_unset or [])]
    return PersonUpdate(link_kind, other, set_, set_once, unset)


class KnownPersons:
    """The worker's map of distinct id -> person, learnt from Redis (`resolve_persons.lua` answers
    with every distinct id it touched and every merge it made). A distinct id it does not hold, or an
    event that links two ids, goes to Redis; every other event is resolved here. Merges made
    elsewhere (another worker) reach it only when one of the ids is resolved again; until then its
    events would count under the merged person, so before a batch is counted the worker learns the
    merges of the project's merge log past `merges_read` (`StateStore.merges_after`), in the order
    they were made. Bounded: `trim` clears it past `limit` ids."""

    def __init__(self, limit: int = 2_000_000) -> None:
        self.limit = limit
        self._person: dict[str, int] = {}
        self._ids: dict[int, set[str]] = {}
        # Entries of the merge log applied here; read before anything is learnt (None: not yet), so
        # every person learnt after is current as of it and only later merges can make one stale.
        self.merges_read: int | None = None

    def get(self, distinct_id: str) -> int | None:
        return self._person.get(distinct_id)

    def trim(self) -> None:
        """Forget everything once past the limit (only between batches: a batch's persons stay)."""
        if len(self._person) > self.limit:
            self._person.clear()
            self._ids.clear()

    def learn(self, pairs: dict[str, int], merges: list[tuple[int, int]]) -> None:
        for source, target in merges:
            for did in self._ids.pop(source, ()):
                self._person[did] = target
                self._ids.setdefault(target, set()).add(did)
        for did, person in pairs.items():
            old = self._person.get(did)
            if old is not None and old != person:
                self._ids.get(old, set()).discard(did)
            self._person[did] = person
            self._ids.setdefault(person, set()).add(did)


def as_survivors(persons: np.ndarray, merged: dict[int, int]) -> np.ndarray:
    """A column of person ids read as the persons they became (`merged`: merged person -> its
    survivor), each distinct id looked up once."""
    if not merged:
        return persons
    found, back = np.unique(persons, return_inverse=True)
    return np.array([merged.get(p, p) for p in found.tolist()], dtype=np.int64)[back]
