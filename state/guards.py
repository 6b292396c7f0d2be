"""The uuid guards a project's events were counted under, as the worker holds them (no I/O).

Every event counted leaves a guard in the project's guard log (`keys.guard_log`, records of
`state/records.py`): its uuid and the copy counted (topic tag, partition, offset) with its person.
The log only grows, and the apply script appends to it only when it holds exactly the records the
worker has read (`StateStore.apply`), so the worker's index of it answers "was this uuid counted,
and from which copy?" without a Redis command per event. Redis keeps one append per batch.
"""

from __future__ import annotations

import threading

import numpy as np

from state.records import GUARD_RECORD, Copy

_COPY_FIELDS = ["tag", "partition", "offset", "person"]


class GuardIndex:
    """The guards of one project's log, as far as `known` records: recent ones in a dict, the rest in
    arrays sorted by uuid, merged in when the dict passes `recent_limit` (a merge copies the arrays
    once, so not per batch). Safe to read while another thread adds."""

    def __init__(self, recent_limit: int = 200_000) -> None:
        self.known = 0  # records of the log held here
        self.legacy = False  # the project also has guards from before the log (`seen:<bucket>` hashes)
        self.recent_limit = recent_limit
        self._uuids = np.empty(0, dtype="V16")
        self._copies = np.empty(0, dtype=GUARD_RECORD[_COPY_FIELDS])
        self._recent: dict[bytes, Copy] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._uuids) + len(self._recent)

    def add(self, records: np.ndarray) -> None:
        """Records read from the log, in its order, starting at record `known`."""
        if len(records) > self.recent_limit:
            with self._lock:
                self._merge(records["uuid"], records[_COPY_FIELDS])
                self.known += len(records)
            return
        self.add_copies([(r[0], (r[1], r[2], r[3], r[4])) for r in records.tolist()])

    def add_copies(self, guards: list[tuple[bytes, Copy]]) -> None:
        """Guards appended to the log at record `known`, in its order."""
        with self._lock:
            recent = self._recent
            for key, copy in guards:
                recent.setdefault(key, copy)
            self.known += len(guards)
            if len(recent) > self.recent_limit:
                merged = np.array([(k, *c) for k, c in recent.items()], dtype=GUARD_RECORD)
                self._merge(merged["uuid"], merged[_COPY_FIELDS])
                self._recent = {}

    def _merge(self, uuids: np.ndarray, copies: np.ndarray) -> None:
        order = np.argsort(uuids, kind="stable")
        uuids, copies = uuids[order], copies[order]
        at = np.searchsorted(self._uuids, uuids, side="right")  # after an equal one: the first stays found
        self._uuids = np.insert(self._uuids, at, uuids)
        self._copies = np.insert(self._copies, at, copies)

    def find(self, keys: list[bytes]) -> list[Copy | None]:
        """The copy each uuid (`guard_key`) was counted from, None for a uuid never counted."""
        with self._lock:
            found: list[Copy | None] = [None] * len(keys)
            n = len(self._uuids)
            if n and keys:  # the arrays hold older records than the dict
                asked = np.frombuffer(b"".join(keys), dtype="V16")
                at = np.searchsorted(self._uuids, asked).clip(max=n - 1)
                for i in np.flatnonzero(self._uuids[at] == asked).tolist():
                    found[i] = tuple(self._copies[at[i]].tolist())  # type: ignore[assignment]
            recent = self._recent
            if recent:
                for i, key in enumerate(keys):
                    if found[i] is None:
                        found[i] = recent.get(key)
            return found
