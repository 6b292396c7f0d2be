"""PostHog's retention test cases (`tests/conformance/retention.jsonl`), end to end."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conformance import feed, load_cases, now_of
from tests.conftest import Stack

CASES = load_cases("retention")


def _padded(rows: list[dict[str, Any]], n: int) -> list[list[int]]:
    return [[v["count"] for v in row["values"]] + [0] * (n - len(row["values"])) for row in rows]


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_retention_case(running: Stack, case: dict[str, Any]) -> None:
    project = feed(running, case)
    reply = httpx.post(f"{running.api_url}/api/environments/{project.id}/insights/retention/",
                       json={**case["query"], "refresh": "blocking"}, timeout=60,
                       headers={"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": now_of(case)})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    result = body["result"]
    expect = case["expect"]
    n = int(case["query"].get("total_intervals") or 11)
    if "breakdown_values" in expect:
        by_value: dict[str, list] = {}
        for row in result:
            by_value.setdefault(row["breakdown_value"], []).append(row)
        assert sorted(by_value) == sorted(expect["breakdown_values"])
        for value, matrix in expect["counts_by_breakdown"].items():
            assert _padded(by_value[value], n) == matrix, value
        return
    if "row_count" in expect:
        assert len(result) == expect["row_count"]
    if "row_labels" in expect:
        assert [r["label"] for r in result] == expect["row_labels"]
    if "row_dates" in expect:
        assert [r["date"] for r in result] == expect["row_dates"]
    if "first_row_date" in expect:
        assert result[0]["date"] == expect["first_row_date"]
    if "counts" in expect:
        assert _padded(result, n) == expect["counts"]
    # The row's people URL lists exactly the cohort.
    if result and result[0]["values"][0]["count"]:
        people = httpx.get(f"{running.api_url}{result[0]['people_url']}", timeout=60,
                           headers={"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": now_of(case)})
        assert people.status_code == 200, people.text
        assert len(people.json()["result"]) == result[0]["values"][0]["count"]
