"""Mutations of valid insight requests, for the API fuzz (tests/test_insight_fuzz_e2e.py).

Every endpoint has a valid body; a mutation replaces one field (top level, or inside an entity, a
property filter or an exclusion) by a value of the kind that broke things before: huge, negative and
zero numbers, extreme and malformed dates, wrong types, deep nesting, long strings; or adds an
unknown field. Pure: it builds requests, the test sends them.
"""

from __future__ import annotations

import random
from typing import Any

PAGEVIEW = {"id": "$pageview", "type": "events", "order": 0}
FILTER = {"key": "$browser", "value": "Chrome", "operator": "exact", "type": "event"}
FUNNEL = {"events": [{**PAGEVIEW, "properties": [FILTER]}, {"id": "signed up", "type": "events", "order": 1}],
          "funnel_window_interval": 14, "funnel_window_interval_unit": "day", "date_from": "-30d",
          "funnel_viz_type": "steps", "breakdown": "$browser", "breakdown_type": "event", "bin_count": 5,
          "exclusions": [{"id": "purchase", "type": "events", "funnel_from_step": 0, "funnel_to_step": 1}],
          "funnel_order_type": "ordered", "interval": "day", "breakdown_limit": 5}
VALID: dict[str, dict[str, Any]] = {
    "trend": {"events": [{**PAGEVIEW, "math": "dau", "properties": [FILTER]}, {"id": "signed up", "order": 1}],
              "date_from": "-14d", "interval": "day", "breakdown": "$browser", "breakdown_type": "event",
              "breakdown_limit": 5, "formula": "A+B", "compare": True, "display": "ActionsLineGraph",
              "properties": [FILTER], "smoothing_intervals": 1, "filter_test_accounts": False},
    "funnel": FUNNEL,
    "funnel/people": {**FUNNEL, "funnel_step": 2, "limit": 10, "offset": 0},
    "funnel/correlation": {**FUNNEL, "funnel_correlation_type": "events"},
    "retention": {"target_entity": {"id": "$pageview", "type": "events"},
                  "returning_entity": {"id": "signed up", "type": "events"}, "period": "Week",
                  "total_intervals": 5, "date_to": "2026-11-20", "retention_type": "retention_first_time",
                  "breakdown": "$browser", "breakdown_type": "event", "breakdown_limit": 3, "properties": [FILTER]},
    "retention/people": {"target_entity": {"id": "$pageview", "type": "events"}, "period": "Day",
                         "total_intervals": 7, "selected_interval": 1},
    "path": {"include_event_types": ["$pageview", "custom_event"], "step_limit": 5, "date_from": "-30d",
             "start_point": "https://shop.example/", "exclude_events": ["purchase"], "edge_limit": 50,
             "path_groupings": ["/docs/*"], "min_edge_weight": 1, "max_edge_weight": 1000,
             "local_path_cleaning_filters": [{"regex": "\\d+", "alias": "<id>"}], "path_type": "$pageview"},
}

NUMBERS = [0, -1, -(10**12), 10**12, 10**30, 1e308, -1e308, 0.5, 2**63, "NaN", "*", "1e400", "-0"]
DATES = ["-10000000000d", "9999-12-31", "0001-01-02", "0001-01-01T00:00:00+14:00", "2026-11-15Tgarbage",
         "2026-11-15T25:99:00", "2026-11-15T00:00:00+99:00", "all", "-1000000y", "9999-12-31T23:59:59",
         "-0d", "dStart", "2026-13-45", "2026-6-1", ""]
TYPES = [None, True, "", "x", [], [1], ["x"], {}, {"a": 1}, [[]], [{}], "x" * 5000]


def deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def odd_value(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(NUMBERS)
    if roll < 0.55:
        return rng.choice(DATES)
    if roll < 0.95:
        return rng.choice(TYPES)
    return deep(rng.choice([50, 900]))


def _places(body: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(container, key) of every field a mutation may replace."""
    out: list[tuple[Any, Any]] = [(body, k) for k in body]
    for value in body.values():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                out += [(item, k) for k in item]
                for inner in item.values():
                    if isinstance(inner, list):
                        out += [(x, k) for x in inner if isinstance(x, dict) for k in x]
    return out


def mutate(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    """A copy with one to three fields replaced, or an unknown one added."""
    import copy

    body = copy.deepcopy(body)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if rng.random() < 0.08:
            body[rng.choice(["unknown_field", "shown_as", "insight", "refresh", "explicit_date", "format"])] = (
                rng.choice(["Stickiness", "Lifecycle", "LIFECYCLE", "STICKINESS", "csv", "blocking", 1]))
            continue
        container, key = rng.choice(_places(body))
        container[key] = odd_value(rng)
    return body


def requests(seed: int, count: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(endpoint, method, body) triples: mostly mutated, a few valid ones to check those still work."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        endpoint = rng.choice(list(VALID))
        body = VALID[endpoint] if rng.random() < 0.05 else mutate(rng, VALID[endpoint])
        out.append((endpoint, rng.choice(["POST", "POST", "GET"]), body))
    return out
