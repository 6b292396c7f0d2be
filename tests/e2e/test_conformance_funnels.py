"""PostHog's funnel and funnel-correlation test cases (`tests/conformance/funnels.jsonl`), end to end."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conformance import feed, load_cases, now_of
from tests.conftest import ProjectHandle, Stack

CASES = load_cases("funnels")


def _funnel(project: ProjectHandle, query: dict, now: str, path: str = "funnel/") -> httpx.Response:
    return httpx.post(f"{project.stack.api_url}/api/environments/{project.id}/insights/{path}",
                      json={**query, "refresh": "blocking"}, timeout=60,
                      headers={"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": now})


def _people(project: ProjectHandle, url: str, now: str) -> list[list[str]]:
    reply = httpx.get(url, headers={"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": now}, timeout=60)
    assert reply.status_code == 200, reply.text
    return [p["distinct_ids"] for p in reply.json()["results"][0]["people"]]


def _same_actors(actual: list[list[str]], expected: list[str]) -> None:
    """Each expected distinct id belongs to exactly one returned actor, and nothing else is returned."""
    assert len(actual) == len(expected), (actual, expected)
    for distinct_id in expected:
        assert sum(distinct_id in ids for ids in actual) == 1, (distinct_id, actual)


def _check_steps(actual: list[dict], expected: list[dict]) -> None:
    by_order = {s["order"]: s for s in actual}
    for step in expected:
        got = by_order[step["order"]]
        for field, value in step.items():
            if field in ("average_conversion_time", "median_conversion_time") and value is not None:
                assert got[field] == pytest.approx(value, rel=1e-6), (field, got[field], value)
            else:
                assert got[field] == value, (field, got.get(field), value, step["order"])


def _url(step: dict, n: int) -> str:
    return step["converted_people_url"] if n > 0 else step["dropped_people_url"]


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_funnel_case(running: Stack, case: dict[str, Any]) -> None:
    project = feed(running, case)
    now = now_of(case)
    if "correlation" in case["expect"]:
        _check_correlation(project, case, now)
        return
    reply = _funnel(project, case["query"], now)
    assert reply.status_code == 200, reply.text
    result = reply.json()["result"]
    expect = case["expect"]
    if expect.get("empty_result_also_accepted") and result == []:
        return
    if "result_length" in expect:
        assert len(result) == expect["result_length"]
    if "steps" in expect:
        _check_steps(result, expect["steps"])
    for key, sign in (("people_at_step", 1), ("people_dropped_at_step", -1)):
        for n, ids in expect.get(key, {}).items():
            step = result[abs(int(n)) - 1]
            _same_actors(_people(project, _url(step, sign * abs(int(n))), now), ids)
    for n, count in expect.get("people_count_at_step", {}).items():
        step = result[abs(int(n)) - 1]
        assert len(_people(project, _url(step, int(n)), now)) == count
    nested = isinstance(result, list) and result and isinstance(result[0], list)
    groups = {tuple(g[0]["breakdown_value"]): g for g in result} if nested else {}
    if "sorted_breakdown_values" in expect:
        assert sorted(list(v) for v in groups) == expect["sorted_breakdown_values"]
    if "breakdowns" in expect:
        order = [list(v) for v in groups]
        wanted = [b["breakdown_value"] for b in expect["breakdowns"]]
        if expect.get("breakdown_order") == "as_returned":
            assert order == wanted
        for item in expect["breakdowns"]:
            _check_steps(groups[tuple(item["breakdown_value"])], item["steps"])
    for item in expect.get("people_at_step_by_breakdown", []):
        value = item["breakdown_value"]
        step = groups[tuple(value) if isinstance(value, list) else (value,)][item["step"] - 1]
        _same_actors(_people(project, step["converted_people_url"], now), item["distinct_ids"])
    for item in expect.get("people_count_at_step_by_breakdown", []):
        value = item["breakdown_value"]
        step = groups[tuple(value) if isinstance(value, list) else (value,)][item["step"] - 1]
        assert len(_people(project, step["converted_people_url"], now)) == item["count"]
    if "time_to_convert" in expect:
        wanted = expect["time_to_convert"]
        assert result["bins"] == wanted["bins"]
        assert result["average_conversion_time"] == pytest.approx(wanted["average_conversion_time"], rel=1e-6)
    if "trend_row_count" in expect:
        assert result[0]["count"] == expect["trend_row_count"]
    for row in expect.get("trend_rows", []):
        got = result[0]
        i = row["index"]
        if "period_start" in row:
            assert got["days"][i] == row["period_start"]
        if "reached_from_step_count" in row:
            assert got["reached_from_step_count"][i] == row["reached_from_step_count"], row
        if "reached_to_step_count" in row:
            assert got["reached_to_step_count"][i] == row["reached_to_step_count"], row
        if "conversion_rate" in row:
            assert got["data"][i] == pytest.approx(row["conversion_rate"]), row


def _check_correlation(project: ProjectHandle, case: dict[str, Any], now: str) -> None:
    reply = _funnel(project, case["query"], now, "funnel/correlation/")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"result", "last_refresh", "is_cached"}
    rows = body["result"]["events"]
    wanted = case["expect"]["correlation"]["events"]
    assert [r["event"]["event"] for r in rows] == [w["event"] for w in wanted]
    for row, want in zip(rows, wanted, strict=True):
        assert row["success_count"] == want["success_count"] and row["failure_count"] == want["failure_count"]
        assert row["odds_ratio"] == pytest.approx(want["odds_ratio"], abs=1e-7)
        assert row["correlation_type"] == want["correlation_type"]
