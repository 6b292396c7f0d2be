"""Property filter semantics (spec §4.4) and definition contributions (no services)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.definitions import BREAKDOWN_NULL, Breakdown, Definition
from schemas.filters import FilterError, parse_filters

NOW = datetime(2024, 3, 7, tzinfo=UTC)
EVENT = {"$browser": "Chrome", "amount": 42, "flag": True, "url": "https://x.dev/pricing/", "empty": None,
         "when": "2024-03-01T00:00:00Z", "n": "17.5"}
PERSON = {"email": "ana@posthog.com", "plan": "pro"}


def matches(raw: object) -> bool:
    return parse_filters(raw).matches(EVENT, PERSON, NOW)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([{"key": "$browser", "value": "Chrome"}], True),
        ([{"key": "$browser", "value": "chrome"}], False),
        ([{"key": "$browser", "value": ["Safari", "Chrome"]}], True),
        ([{"key": "$browser", "operator": "is_not", "value": ["Safari", "Chrome"]}], False),
        ([{"key": "missing", "operator": "is_not", "value": "x"}], True),
        ([{"key": "flag", "value": "true"}], True),
        ([{"key": "amount", "value": 42}], True),
        ([{"key": "amount", "operator": "gt", "value": 41}], True),
        ([{"key": "amount", "operator": "lte", "value": "41"}], False),
        ([{"key": "n", "operator": "gte", "value": 17.5}], True),
        ([{"key": "$browser", "operator": "gt", "value": 1}], False),
        ([{"key": "url", "operator": "icontains", "value": "PRICING"}], True),
        ([{"key": "url", "operator": "not_icontains", "value": "pricing"}], False),
        ([{"key": "missing", "operator": "not_icontains", "value": "x"}], True),
        ([{"key": "url", "operator": "regex", "value": r"x\.dev/p"}], True),
        ([{"key": "url", "operator": "not_regex", "value": "^https"}], False),
        ([{"key": "empty", "operator": "is_set"}], False),
        ([{"key": "empty", "operator": "is_not_set"}], True),
        ([{"key": "amount", "operator": "between", "value": [40, 45]}], True),
        ([{"key": "amount", "operator": "not_between", "value": [40, 45]}], False),
        ([{"key": "when", "operator": "is_date_before", "value": "2024-03-02"}], True),
        ([{"key": "when", "operator": "is_date_after", "value": "-3d"}], False),
        ([{"key": "email", "operator": "not_icontains", "value": "@posthog.com", "type": "person"}], False),
        ([{"key": "plan", "value": "pro", "type": "person"}, {"key": "amount", "operator": "lt", "value": 50}], True),
        ({"type": "OR", "values": [{"key": "plan", "value": "free", "type": "person"},
                                   {"type": "AND", "values": [{"key": "$browser", "value": "Chrome"}]}]}, True),
        ({"$browser": "Chrome", "amount__gt": 100}, False),
        ([], True),
    ],
)
def test_operators(raw: object, expected: bool) -> None:
    assert matches(raw) is expected


def test_invalid_filters() -> None:
    for raw, attr in (([{"key": "a", "operator": "almost"}], "properties__0__operator"),
                      ([{"key": "a", "operator": "regex", "value": "("}], "properties__0__value"),
                      ([{"key": "a", "operator": "between", "value": 3}], "properties__0__value"),
                      ([{"key": "a", "value": 1, "type": "cohort"}], "properties__0__type"),
                      ("nonsense", "properties")):
        with pytest.raises(FilterError) as info:
            parse_filters(raw)
        assert info.value.attr == attr


def test_definition_hash_and_contribution() -> None:
    filters = parse_filters([{"key": "amount", "operator": "gt", "value": 10}])
    breakdown = Breakdown((("event", "url"),), normalize_url=True)
    d = Definition(1, "$pageview", filters, breakdown, value_property=("event", "amount"))
    same = Definition(1, "$pageview", parse_filters([{"key": "amount", "operator": "gt", "value": 10}]),
                      Breakdown((("event", "url"),), normalize_url=True), value_property=("event", "amount"))
    assert d.hash == same.hash and d.hash != Definition(1, "$pageview", filters).hash
    assert d.contribution("$pageview", EVENT, PERSON, NOW) == ("https://x.dev/pricing", 42.0)
    assert d.contribution("click", EVENT, PERSON, NOW) is None
    assert d.contribution("$pageview", {**EVENT, "amount": 3}, PERSON, NOW) is None
    multi = Definition(1, None, parse_filters([]), Breakdown((("event", "$browser"), ("person", "team"))))
    assert multi.contribution("x", EVENT, PERSON, NOW) == (f'["Chrome","{BREAKDOWN_NULL}"]', None)
    assert Definition.from_json(d.to_json()).hash == d.hash
