"""PostHog's paths test cases (`tests/conformance/paths.jsonl`), end to end."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conformance import feed, load_cases, now_of
from tests.conftest import Stack

CASES = load_cases("paths")


def _same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for field, value in expected.items():
        if field == "average_conversion_time":
            assert actual[field] == pytest.approx(value), (actual, expected)
        else:
            assert actual[field] == value, (actual, expected)


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_paths_case(running: Stack, case: dict[str, Any]) -> None:
    project = feed(running, case)
    reply = httpx.post(f"{running.api_url}/api/environments/{project.id}/insights/path/",
                       json={**case["query"], "refresh": "blocking"}, timeout=60,
                       headers={"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": now_of(case)})
    assert reply.status_code == 200, reply.text
    edges = reply.json()["result"]
    expect = case["expect"]
    if "edge_count" in expect:
        assert len(edges) == expect["edge_count"], edges
    wanted = expect["edges"]
    if expect["match"] == "exact":
        assert len(edges) == len(wanted), edges
    assert len(edges) >= len(wanted), edges
    for got, want in zip(edges, wanted, strict=False):
        _same(got, want)
