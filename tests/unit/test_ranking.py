"""How breakdown values are chosen and ordered (no services)."""

from __future__ import annotations

import orjson

from serving.funnels import rank_breakdown_groups
from serving.trends import kept_values, shown_order


def test_trend_values_kept_by_total_then_value_descending_and_shown_ascending() -> None:
    totals = {"a": 2, "b": 2, "c": 2, "d": 5, "e": 1}
    kept, folded = kept_values(list(totals), totals.__getitem__, False, 3)
    assert kept == ["d", "b", "c"] and sorted(folded) == ["a", "e"]
    assert shown_order(list(totals), totals.__getitem__, False) == ["d", "a", "b", "c", "e"]


def test_several_properties_compare_part_by_part() -> None:
    # As JSON text '["a","b"]' sorts after '["a b","c"]' ('"' > ' '); as parts "a" < "a b".
    values = [orjson.dumps(v).decode() for v in (["a", "b"], ["a b", "c"])]
    ones = dict.fromkeys(values, 1)
    assert [orjson.loads(v) for v in shown_order(values, ones.__getitem__, True)] == [["a", "b"], ["a b", "c"]]
    kept, _ = kept_values(values, ones.__getitem__, True, 1)
    assert orjson.loads(kept[0]) == ["a b", "c"]


def test_funnel_groups_ranked_by_the_last_step_then_entrants_then_value() -> None:
    reached = {("Edge",): [1, 1, 2], ("Firefox",): [3, 2], ("Opera",): [3], ("Brave",): [3]}
    assert rank_breakdown_groups(reached, 3) == [("Firefox",), ("Brave",), ("Opera",), ("Edge",)]
    # A tie on the last step is decided by the entrants, not by the middle steps (PostHog's own test):
    tie = {("Chrome", "95"): [3], ("Safari", "14"): [1], ("Safari", "15"): [2]}
    assert rank_breakdown_groups(tie, 3) == [("Chrome", "95"), ("Safari", "14"), ("Safari", "15")]


def test_the_null_group_of_several_properties() -> None:
    """A person with no value for any property of a list breakdown is in the null group (this used to
    be a 500: the empty value was read as JSON)."""
    from schemas.definitions import Breakdown

    assert Breakdown((("event", "a"), ("event", "b"))).parts("") == ("", "")
    assert Breakdown((("event", "a"),), as_list=True).parts("") == ("",)
