"""The kept log's codec (state/records.py): every summarised definition's kept events of a person in
one string, in blocks tagged by definition."""

from __future__ import annotations

from state.records import StoredEvent, definition_records, encode_person_events, kept_block, rewritten_log

A = encode_person_events([StoredEvent(1000, "20240101", "u1", b'{"s":1}'), StoredEvent(2000, "20240101", "u2", b"")])
B = encode_person_events([StoredEvent(1500, "20240101", "u3", '["€"]'.encode())])


def test_each_definition_reads_its_own_blocks_in_the_order_appended() -> None:
    log = kept_block("aa", A[:27]) + kept_block("bb", B) + kept_block("aa", A[27:])
    assert definition_records(log, "aa") == A
    assert definition_records(log, "bb") == B
    assert definition_records(log, "cc") == b""
    assert definition_records(b"", "aa") == b""


def test_a_damaged_tail_goes_to_every_definition_for_the_summariser_to_drop() -> None:
    log = kept_block("aa", A) + b"bb,99;short"
    assert definition_records(log, "aa") == A + b"bb,99;short"
    assert definition_records(log, "bb") == b"bb,99;short"
    assert definition_records(b"no block here", "aa") == b"no block here"


def test_a_rewritten_log_keeps_the_others_blocks_and_never_gets_shorter() -> None:
    log = kept_block("aa", A) + kept_block("bb", B) + kept_block("aa", A)
    for longer_than in range(len(log) + 50):
        rewritten = rewritten_log(log, "aa", B, longer_than)
        assert len(rewritten) > longer_than
        assert definition_records(rewritten, "aa") == B
        assert definition_records(rewritten, "bb") == B
    emptied = rewritten_log(log, "aa", b"", len(log))
    assert len(emptied) > len(log) and definition_records(emptied, "aa") == b""
    # Padding from an earlier rewrite is dropped and made again; the other definition's block stays whole.
    again = rewritten_log(emptied + kept_block("aa", A), "bb", b"", len(emptied) + 60)
    assert definition_records(again, "bb") == b"" and definition_records(again, "aa") == A
    assert len(again) > len(emptied) + 60
