"""The worker's index of a project's guard log, and the guard record codec (no services)."""

from __future__ import annotations

import uuid

import numpy as np

from state.guards import GuardIndex
from state.records import (
    GUARD_RECORD,
    NO_TOPIC,
    guard_key,
    guard_keys,
    guard_records,
    read_guards,
    read_legacy_guard,
    tag_code,
)


def _records(keys: np.ndarray, tag: int, partition: int, first_offset: int) -> np.ndarray:
    n = len(keys)
    return guard_records(keys, tag, np.full(n, partition), np.arange(first_offset, first_offset + n),
                         np.arange(n) + 100)


def test_a_guard_key_is_a_uuids_own_bytes_or_a_digest_of_other_text() -> None:
    u = uuid.uuid4()
    assert guard_key(str(u)) == u.bytes
    assert len(guard_key("u-1")) == 16 and guard_key("u-1") != guard_key("u-2")
    assert guard_key("x" * 36) == guard_key("x" * 36) != guard_key("y" * 36)  # 36 characters, not hex
    canonical = [str(uuid.uuid4()) for _ in range(3)]
    assert guard_keys(canonical).tobytes() == b"".join(map(guard_key, canonical))
    assert guard_keys([*canonical, "u-1"]).tobytes() == b"".join(map(guard_key, [*canonical, "u-1"]))


def test_guard_records_read_back_and_a_torn_tail_is_left_out() -> None:
    keys = guard_keys([str(uuid.uuid4()) for _ in range(3)])
    raw = _records(keys, tag_code("t1"), 3, 10).tobytes()
    assert len(raw) == 3 * GUARD_RECORD.itemsize == 120
    back = read_guards(raw + b"\x01" * 7)
    assert back.tolist() == [(k.tobytes(), tag_code("t1"), 3, 10 + i, 100 + i) for i, k in enumerate(keys)]


def test_guards_from_before_the_log_name_their_copy_or_no_topic() -> None:
    assert read_legacy_guard(b"0a1b2c3d:2:5:7") == (tag_code("0a1b2c3d"), 2, 5, 7)
    assert read_legacy_guard(b"2:5:7") == (NO_TOPIC, 2, 5, 7)
    assert read_legacy_guard(b"2:5") == (NO_TOPIC, 2, 5, -1)
    assert read_legacy_guard(b"nonsense") == (NO_TOPIC, 0, -1, -1)


def test_the_index_finds_every_copy_as_it_grows_and_keeps_the_first() -> None:
    rng = np.random.default_rng(7)
    keys = np.frombuffer(rng.bytes(16 * 400), dtype="V16")
    index = GuardIndex(capacity=16)
    for start in range(0, 400, 30):  # batches as planned: the table grows past half full
        index.add(_records(keys[start:start + 30], 1, 0, start))
    assert len(index) == 400 and index.known == 0  # none read from a log
    assert index.records()["offset"].tolist() == list(range(400))
    asked = np.concatenate([keys, np.frombuffer(bytes(16), dtype="V16")])
    found, copies, logged = index.find(asked)
    assert found.tolist() == [True] * 400 + [False]
    assert copies["offset"][:400].tolist() == list(range(400)) and set(copies["tag"][:400].tolist()) == {1}
    index.add(_records(keys[5:6], 9, 9, 9))  # a later record of a uuid held: the first stays
    assert index.find(keys[5:6])[1]["offset"].tolist() == [5]
    alike = np.frombuffer(b"".join(bytes([i]) * 16 for i in range(6)), dtype="V16")  # halves alike: one hash
    shared = GuardIndex(capacity=8)
    shared.add(_records(alike[:5], 1, 0, 0))
    found, copies, _ = shared.find(alike)
    assert found.tolist() == [True] * 5 + [False] and copies["offset"][:5].tolist() == [0, 1, 2, 3, 4]
    buffered = GuardIndex(capacity=64)  # the same, added one by one
    for i in range(5):
        buffered.add(_records(alike[i:i + 1], 1, 0, i))
    found, copies, _ = buffered.find(alike)
    assert found.tolist() == [True] * 5 + [False] and copies["offset"][:5].tolist() == [0, 1, 2, 3, 4]
    planned = GuardIndex()  # a guard planned, then the log's record of the same uuid: the log's is found
    planned.add(_records(keys[:2], 1, 0, 0), logged=False)
    planned.add(_records(keys[1:3], 2, 5, 50))
    found, copies, logged = planned.find(keys[:4])
    assert found.tolist() == [True, True, True, False] and logged.tolist() == [False, True, True, False]
    assert copies["offset"][:3].tolist() == [0, 50, 51]
