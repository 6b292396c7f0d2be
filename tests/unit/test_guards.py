"""The worker's index of a project's guard log, and the guard record codec (no services)."""

from __future__ import annotations

import uuid

import numpy as np

from state.guards import GuardIndex
from state.records import GUARD_RECORD, guard_key, pack_guards, read_guards, read_legacy_guard, tag_code


def test_a_guard_key_is_a_uuids_own_bytes_or_a_digest_of_other_text() -> None:
    u = uuid.uuid4()
    assert guard_key(str(u)) == u.bytes
    assert len(guard_key("u-1")) == 16 and guard_key("u-1") != guard_key("u-2")
    assert guard_key("x" * 36) == guard_key("x" * 36) != guard_key("y" * 36)  # 36 characters, not hex


def test_guard_records_read_back_and_a_torn_tail_is_left_out() -> None:
    guards = [(uuid.uuid4().bytes, (tag_code("t1"), 3, 10 + i, 100 + i)) for i in range(3)]
    raw = pack_guards(guards)
    assert len(raw) == 3 * GUARD_RECORD.itemsize == 120
    back = read_guards(raw + b"\x01" * 7)
    assert [(r[0], (r[1], r[2], r[3], r[4])) for r in back.tolist()] == guards


def test_guards_from_before_the_log_name_their_copy_or_no_topic() -> None:
    assert read_legacy_guard(b"0a1b2c3d:2:5:7") == (tag_code("0a1b2c3d"), 2, 5, 7)
    assert read_legacy_guard(b"2:5:7") == (-1, 2, 5, 7)
    assert read_legacy_guard(b"2:5") == (-1, 2, 5, -1)
    assert read_legacy_guard(b"nonsense") == (-1, -1, -1, -1)


def test_the_index_finds_every_copy_across_merges_and_keeps_the_first() -> None:
    rng = np.random.default_rng(7)
    index = GuardIndex(recent_limit=50)
    keys = [bytes(rng.bytes(16)) for _ in range(400)]
    for start in range(0, 300, 30):  # batches as the apply appends them: merged past 50 recent
        index.add_copies([(k, (1, 0, start + i, i)) for i, k in enumerate(keys[start:start + 30])])
    index.add(read_guards(pack_guards([(k, (2, 1, 300 + i, i)) for i, k in enumerate(keys[300:])])))
    assert index.known == 400 == len(index)
    found = index.find([*keys, bytes(16)])
    assert [c[2] for c in found[:400] if c is not None] == list(range(400)) and found[400] is None
    index.add_copies([(keys[5], (9, 9, 9, 9))])  # a later record of a uuid held: the first stays
    assert index.find([keys[5]]) == [(1, 0, 5, 5)]
    big = GuardIndex(recent_limit=10)  # a log read in one go is sorted in directly
    big.add(read_guards(pack_guards([(k, (1, 0, i, i)) for i, k in enumerate(keys)])))
    assert big.find(keys[::50]) == [(1, 0, i, i) for i in range(0, 400, 50)]
