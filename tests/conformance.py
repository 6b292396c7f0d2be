"""Feeding the conformance cases (`tests/conformance/`) through capture and comparing PostHog's expected figures."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.conftest import ProjectHandle, Stack, make_project

CONFORMANCE = Path(__file__).resolve().parent / "conformance"  # copied from the shared reference: see its README


def load_cases(kind: str) -> list[dict[str, Any]]:
    path = CONFORMANCE / f"{kind}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def feed(running: Stack, case: dict[str, Any]) -> ProjectHandle:
    """A fresh project with the case's persons identified first, then its events, all applied."""
    team = case.get("team") or {}
    project = make_project(running, timezone=case.get("timezone") or "UTC",
                           test_account_filters=team.get("test_account_filters") or [])
    first = min(datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in case["events"])
    before = (first - timedelta(days=400)).isoformat()
    identities = []
    for person in case.get("persons", []):
        main, *others = person["distinct_ids"]
        props = person.get("properties") or {}
        identities.append({"event": "$identify", "distinct_id": main, "timestamp": before,
                           "properties": {"$set": props}})
        identities += [{"event": "$identify", "distinct_id": main, "timestamp": before,
                        "properties": {"$anon_distinct_id": other, "$set": props}} for other in others]
    if identities:
        reply = project.capture(identities)
        assert reply.status_code == 200, reply.text
        running.wait_applied()
    reply = project.capture([{**e, "properties": e.get("properties") or {}} for e in case["events"]])
    assert reply.status_code == 200, reply.text
    running.wait_applied()
    return project


def now_of(case: dict[str, Any]) -> str:
    return case.get("now") or datetime.now(UTC).isoformat()


def _close(actual: Any, expected: Any, tolerance: float = 1e-9) -> bool:
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return math.isclose(float(actual), float(expected), abs_tol=tolerance)
    return actual == expected


def check_trend_series(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for field in ("label", "breakdown_value", "compare_label", "compare", "days", "labels"):
        if field in expected:
            assert actual.get(field) == expected[field], (field, actual.get(field), expected[field])
    for field in ("count", "aggregated_value"):
        if field in expected:
            assert _close(actual.get(field), expected[field]), (field, actual.get(field), expected[field])
    if "data" in expected:
        assert len(actual["data"]) == len(expected["data"]), (actual["data"], expected["data"])
        assert all(_close(a, e) for a, e in zip(actual["data"], expected["data"], strict=True)), (
            actual["data"], expected["data"])
    if "sum_data" in expected:
        assert _close(sum(actual["data"]), expected["sum_data"])
    if "data_prefix" in expected:
        n = len(expected["data_prefix"])
        assert all(_close(a, e) for a, e in zip(actual["data"][:n], expected["data_prefix"], strict=True))
    if "labels_prefix" in expected:
        assert actual["labels"][: len(expected["labels_prefix"])] == expected["labels_prefix"]
    for point in expected.get("points", []):
        index = point["index"]
        if "label" in point:
            assert actual["labels"][index] == point["label"], (point, actual["labels"])
        assert _close(actual["data"][index], point["value"], point.get("tolerance", 1e-9)), (point, actual["data"])


def check_trends(result: list[dict[str, Any]], expect: dict[str, Any]) -> None:
    if "series_count" in expect:
        assert len(result) == expect["series_count"], [r.get("label") for r in result]
    match = expect.get("match")
    series = expect.get("series", [])
    if match == "ordered":
        for item in series:
            check_trend_series(result[item["index"]], item)
    elif match == "by_breakdown_value":
        by_value = {json.dumps(r.get("breakdown_value")): r for r in result}
        for item in series:
            check_trend_series(by_value[json.dumps(item["breakdown_value"])], item)
    elif match == "sorted_by_breakdown_value":
        ordered = sorted(result, key=lambda r: json.dumps(r.get("breakdown_value")))
        for item, actual in zip(series, ordered, strict=False):
            check_trend_series(actual, item)
    if "labels_sorted" in expect:
        assert sorted(r["label"] for r in result) == expect["labels_sorted"]
    if "breakdown_values_sorted" in expect:
        assert sorted(r["breakdown_value"] for r in result) == expect["breakdown_values_sorted"]
