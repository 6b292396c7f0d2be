"""PostHog's trend test cases (`tests/conformance/trends.jsonl`), end to end.

Each case's events go through capture, the dataflow and Redis; its query goes through HTTP. Cases
that need a definition (filters, breakdowns, property maths) ask with `refresh=blocking`, as a
dashboard would on first load, so the backfill builds the state before the answer.
"""

from __future__ import annotations

import pytest

from tests.conformance import check_trends, feed, load_cases, now_of
from tests.conftest import Stack

CASES = load_cases("trends")


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_trends_case(running: Stack, case: dict) -> None:
    project = feed(running, case)
    reply = project.trend({**case["query"], "refresh": "blocking"}, now=now_of(case))
    assert reply.status_code == 200, reply.text
    check_trends(reply.json()["result"], case["expect"])
