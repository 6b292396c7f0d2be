"""The kept log's codec (state/records.py): every summarised definition's kept events of a person in
one string, each append headed by its definitions and their records' lengths."""

from __future__ import annotations

from state.records import (
    StoredEvent,
    definition_records,
    encode_person_events,
    kept_append,
    kept_block,
    rewritten_log,
)

A = encode_person_events([StoredEvent(1000, "20240101", "u1", b'{"s":1}'), StoredEvent(2000, "20240101", "u2", b"")])
B = encode_person_events([StoredEvent(1500, "20240101", "u3", '["€"]'.encode())])


def test_each_definition_reads_its_own_records_in_the_order_appended() -> None:
    log = kept_append([("aa", A[:27]), ("bb", B)]) + kept_block("aa", A[27:])
    assert log.startswith(b"aa,27,bb,%d;" % len(B))
    assert definition_records(log, "aa") == A
    assert definition_records(log, "bb") == B
    assert definition_records(log, "cc") == b""
    assert definition_records(b"", "aa") == b""


def test_a_damaged_tail_goes_to_every_definition_for_the_summariser_to_drop() -> None:
    for tail in (b"bb,99;short", b"bb,2,cc;xyz", b"no header here", b";", b"bb,x;y"):
        log = kept_block("aa", A) + tail
        assert definition_records(log, "aa") == A + tail
        assert definition_records(log, "bb") == tail


def test_a_rewritten_log_keeps_the_others_blocks_and_never_gets_shorter() -> None:
    log = kept_append([("aa", A), ("bb", B)]) + kept_block("bb", A) + kept_block("aa", A)
    for longer_than in range(len(log) + 50):
        rewritten = rewritten_log(log, "aa", B, longer_than)
        assert len(rewritten) > longer_than
        assert definition_records(rewritten, "aa") == B
        assert definition_records(rewritten, "bb") == B + A
    emptied = rewritten_log(log, "aa", b"", len(log))
    assert len(emptied) > len(log) and definition_records(emptied, "aa") == b""
    # Padding from an earlier rewrite is dropped and made again; the other definition's records stay.
    again = rewritten_log(emptied + kept_block("aa", A), "bb", b"", len(emptied) + 60)
    assert definition_records(again, "bb") == b"" and definition_records(again, "aa") == A
    assert len(again) > len(emptied) + 60

