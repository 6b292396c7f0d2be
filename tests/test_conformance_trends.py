"""PostHog's trend test cases (`../shared/conformance/trends.jsonl`), end to end.

Cases whose features are built are compared figure by figure. Every other case must be refused with
a 400 `unsupported`: the API never answers a number it cannot make exact.
"""

from __future__ import annotations

import pytest

from tests.conformance import check_trends, feed, load_cases, now_of
from tests.conftest import Stack

SUPPORTED = {
    "trends-per-day-basic",
    "trends-per-day-cumulative",
    "trends-dau-cumulative",
    "trends-hourly-dstart-dau",
    "trends-week-interval-rounding",
    "trends-weekly-dst-us-pacific",
    "trends-bold-number",
    "trends-compare-relative-7d",
    "trends-wau-daily",
    "trends-wau-hourly",
    "trends-wau-aggregate-wide-range",
    "trends-formula-a-plus-2b",
}
CASES = load_cases("trends")


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_trends_case(running: Stack, case: dict) -> None:
    project = feed(running, case)
    reply = project.trend(case["query"], now=now_of(case))
    if case["id"] in SUPPORTED:
        assert reply.status_code == 200, reply.text
        check_trends(reply.json()["result"], case["expect"])
    else:
        assert reply.status_code == 400, reply.text
        assert reply.json()["code"] == "unsupported", reply.text
