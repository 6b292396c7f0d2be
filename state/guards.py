"""The uuid guards a project's events were counted under, as the worker holds them (no I/O).

Every event counted leaves a guard in the project's guard log (`keys.guard_log`, records of
`state/records.py`): its uuid and the copy counted (topic tag, partition, offset) with its person.
The log only grows, and the apply script appends to it only when it has the length the worker
knows (`StateStore.apply`), so the worker's index of it, with the guards it planned since
(`StateStore.take_guards`), answers "was this uuid counted, and from which copy?" without a Redis
command per event. Redis keeps one append per chunk.
"""

from __future__ import annotations

import threading

import numpy as np

from state.records import GUARD_RECORD

_RAW = np.dtype((np.void, GUARD_RECORD.itemsize))  # a record as its bytes: copied whole, not field by field
_EMPTY = -1
_SHIFT = np.uint64(8)  # the table keeps hash bits 8-39 of each uuid: not the top ones, which chose its slot


class GuardIndex:
    """The guards of one project's log (as far as `known` records) and those planned since: the
    records in order, and a hash table (open addressing, linear probing) from each uuid's hash to
    its record, at most half full. A batch is looked up and added as arrays, each probe a vectorised
    step over the uuids still probing: a few cache lines per uuid, whatever the log's length. A uuid
    held twice is found at its first record read from the log, or else its first planned one. Safe
    to read while another thread adds."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        self.known = 0  # records of the log this process read (`StateStore.read_guard_log`) or appended
        self._count = 0  # records held: read, and planned since
        self.legacy = False  # the project also has guards from before the log (`seen:<bucket>` hashes)
        self._records = np.empty(1024, dtype=_RAW)
        self._logged = np.empty(1024, dtype=bool)  # per record: read from the log, not only planned
        self._slots = np.full(capacity, _EMPTY, dtype=np.int32)  # record number, or _EMPTY
        self._hashes = np.zeros(capacity, dtype=np.uint32)  # the low bits of that record's uuid's `_hash`
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def add(self, records: np.ndarray, logged: bool = True) -> None:
        """Records (`GUARD_RECORD`) in the log's order: read from it (`logged`), or planned to be
        appended to it."""
        n = len(records)
        with self._lock:
            at = self._count
            if at + n > len(self._records):
                size = max(2 * len(self._records), at + n)
                grown, flags = np.empty(size, dtype=_RAW), np.empty(size, dtype=bool)
                grown[:at], flags[:at] = self._records[:at], self._logged[:at]
                self._records, self._logged = grown, flags
            self._records[at:at + n] = np.ascontiguousarray(records).view(_RAW)
            self._logged[at:at + n] = logged
            if 2 * (at + n) > len(self._slots):
                capacity = len(self._slots)
                while 2 * (at + n) > capacity:
                    capacity *= 2
                self._slots = np.full(capacity, _EMPTY, dtype=np.int32)
                self._hashes = np.zeros(capacity, dtype=np.uint32)
                self._place(np.arange(at + n, dtype=np.int32))
            else:
                self._place(np.arange(at, at + n, dtype=np.int32))
            self._count = at + n

    def records(self) -> np.ndarray:
        """The records held, in the order added (`GUARD_RECORD`)."""
        return self._records[:self._count].view(GUARD_RECORD)

    def _place(self, numbers: np.ndarray) -> None:
        """Put records (by number, in log order) in the table: each in the first free slot from its
        home; of several wanting one slot, the earliest record takes it and the rest probe on."""
        hashes = _hash(self._records[numbers].view(GUARD_RECORD)["uuid"])
        slot, mask = _home(hashes, len(self._slots))
        while len(numbers):
            free = np.flatnonzero(self._slots[slot] == _EMPTY)
            claims, claimants = slot[free], numbers[free]
            self._slots[claims[::-1]] = claimants[::-1]  # the earliest written last: it stays
            won = free[self._slots[claims] == claimants]
            self._hashes[slot[won]] = hashes[won] >> _SHIFT
            left = np.ones(len(numbers), dtype=bool)
            left[won] = False
            numbers, hashes, slot = numbers[left], hashes[left], (slot[left] + 1) & mask

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For uuids (`records.guard_keys`): whether each is held, its first guard record (meaningful
        where held: the copy counted, and the person), and whether that record was read from the
        log (else only planned)."""
        hashes = _hash(keys)
        low = (hashes >> _SHIFT).astype(np.uint32)
        found = np.zeros(len(keys), dtype=bool)
        logged = np.zeros(len(keys), dtype=bool)
        copies = np.zeros(len(keys), dtype=_RAW)
        with self._lock:
            slots, table_hashes, records = self._slots, self._hashes, self._records
            slot, mask = _home(hashes, len(slots))
            pending = np.arange(len(keys))
            while len(pending):
                at = slot[pending]
                number = slots[at]
                probing = number != _EMPTY  # an empty slot ends a uuid's probe: not counted
                alike = probing & (table_hashes[at] == low[pending])
                if alike.any():
                    asked, numbers = pending[alike], number[alike]
                    held = records[numbers]
                    same = held.view(GUARD_RECORD)["uuid"] == keys[asked]
                    final = same & self._logged[numbers]  # a logged record ends the probe
                    first = same & ~final & ~found[asked]  # a planned one holds until a logged one turns up
                    for chosen in (final, first):
                        found[asked[chosen]] = True
                        copies[asked[chosen]] = held[chosen]
                        logged[asked[chosen]] = chosen is final
                    probing[np.flatnonzero(alike)[final]] = False
                pending = pending[probing]
                slot[pending] = (slot[pending] + 1) & mask
        return found, copies.view(GUARD_RECORD), logged


def _hash(keys: np.ndarray) -> np.ndarray:
    """A uuid's 64-bit hash: its halves combined and multiplied by an odd constant (Fibonacci
    hashing), so the top bits vary whichever of its bits do (a time-ordered uuid's first bytes, a
    random one's last)."""
    both = np.ascontiguousarray(keys).view("<u8")
    return (both[0::2] ^ both[1::2]) * np.uint64(0x9E3779B97F4A7C15)


def _home(hashes: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Each hash's first slot in a table of `capacity` (a power of two) slots: its top bits."""
    return (hashes >> np.uint64(64 - capacity.bit_length() + 1)).astype(np.int64), capacity - 1
