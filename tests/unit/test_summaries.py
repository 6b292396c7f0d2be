"""The summariser meeting kept events it cannot use (state written by an older version, or damaged):
it drops them, says why, and summarises the rest instead of stopping (no services)."""

from __future__ import annotations

import orjson
import pytest

from dataflows.operators.funnel_attempts import RANK_BITS
from dataflows.operators.summaries import summarise_group, summarise_person
from schemas.errors import RequestError
from schemas.funnels import parse_funnel_request
from state.records import StoredEvent, encode_person_events, read_person_events


def _funnel(steps: int = 2) -> object:
    request = parse_funnel_request({"events": [{"id": f"s{i}", "order": i} for i in range(steps)]}, 7, "UTC", [])
    return request.definition


def _kept(mask: int) -> bytes:
    return orjson.dumps([mask, 0, ""])


DAY_MS = 1_700_000_000_000
GOOD = [StoredEvent(DAY_MS, "20231114", "u1", _kept(0b10)), StoredEvent(DAY_MS + 1000, "20231114", "u2", _kept(0b100))]


def test_records_round_trip() -> None:
    raw = encode_person_events(GOOD)
    assert read_person_events(raw) == (GOOD, b"")


def test_a_regular_person_is_summarised_untouched() -> None:
    plan = summarise_person(_funnel(), "5", encode_person_events(GOOD))
    assert plan.replacement is None and plan.dropped == [] and not plan.irregular
    [(kind, day, value)] = plan.entries
    assert (kind, day) == ("fa", "20231114") and len(value) == 3 * 8  # person, start, g_2


def test_an_event_outside_the_range_is_dropped_and_the_rest_summarised() -> None:
    """Variant (b) of the poison: `ms << 20` of a 1600 event does not fit an int64 row."""
    poison = StoredEvent(-11_676_096_000_000, "16000101", "old", _kept(0b10))
    plan = summarise_person(_funnel(), "5", encode_person_events([poison, *GOOD]))
    assert read_person_events(plan.replacement or b"") == (GOOD, b"")
    [(value, reason, rid)] = plan.dropped
    assert "outside the range" in reason and rid.endswith(":5:old")
    assert orjson.loads(value)["uuid"] == "old"
    rows = {(k, d): v for k, d, v in plan.entries}
    assert rows[("fa", "16000101")] == b""  # whatever the poison left on its day is removed
    assert rows[("fa", "20231114")][8:16] == (DAY_MS << RANK_BITS).to_bytes(8, "little", signed=True)


def test_a_mask_wider_than_any_funnel_and_an_unreadable_tail_are_dropped() -> None:
    wide = StoredEvent(DAY_MS + 5, "20231114", "wide", _kept(1 << 40))
    raw = encode_person_events([*GOOD, wide]) + b"12,garbage"
    plan = summarise_person(_funnel(), "5", raw)
    reasons = {rid.rsplit(":", 1)[-1] if "tail" not in rid else "tail": reason for _, reason, rid in plan.dropped}
    assert "step mask" in reasons["wide"] and reasons["tail"] == "unreadable kept events"
    assert read_person_events(plan.replacement or b"") == (GOOD, b"")


def test_funnels_over_posthogs_step_limit_are_refused() -> None:
    _funnel(32)
    with pytest.raises(RequestError, match="at most 32 steps; this one has 33"):
        _funnel(33)
    with pytest.raises(RequestError, match="at most 32 steps; this one has 64"):
        _funnel(64)


def test_a_survivor_is_summarised_from_its_whole_group_and_the_merged_person_emptied() -> None:
    """Person 7 was merged into 5: 5's attempt rows come from both persons' kept events (7's step 1,
    then 5's step 2 convert), 7 keeps nothing on the days it had events."""
    first = StoredEvent(DAY_MS, "20231114", "u1", _kept(0b10))
    later = StoredEvent(DAY_MS + 86_400_000, "20231115", "u2", _kept(0b100))
    plans = summarise_group(_funnel(), "5", {"5": encode_person_events([later]), "7": encode_person_events([first])})
    together = summarise_person(_funnel(), "5", encode_person_events([first, later]))
    assert plans["5"].entries == together.entries and plans["5"].replacement is None
    assert plans["7"].entries == [("fa", "20231114", b"")] and not plans["7"].irregular
    assert plans["7"].replacement is None and plans["7"].dropped == []


def test_an_unusable_event_of_a_merged_person_is_dropped_from_that_person_only() -> None:
    poison = StoredEvent(DAY_MS + 7, "20231114", "wide", _kept(1 << 40))
    plans = summarise_group(_funnel(), "5", {"5": encode_person_events(GOOD[:1]),
                                             "7": encode_person_events([poison, *GOOD[1:]])})
    assert plans["5"].dropped == [] and plans["5"].replacement is None
    assert [rid for _, _, rid in plans["7"].dropped] == [f"summary:7:{_funnel().hash}:7:wide"]
    assert read_person_events(plans["7"].replacement or b"") == (GOOD[1:], b"")
    assert plans["5"].entries == summarise_person(_funnel(), "5", encode_person_events(GOOD)).entries
