"""Property: the incremental funnel equals the rules of §7.4 applied directly to the sorted events.

For random event streams sent in a shuffled order, with the dataflow killed (kill -9) at a random
point, the funnel answered from state must equal the operator run over the raw events of each actor,
sorted, for random date ranges, order types and windows.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataflows.operators.funnels import StepEvent, funnel
from tests.conftest import Stack, make_project

STEPS = ["view", "signup", "pay"]
BASE = datetime(2024, 7, 1, tzinfo=UTC)


def _direct(events: list[dict], start: datetime, end: datetime, window: float, order: str) -> list[int]:
    """Counts per step computed straight from the events sent."""
    per_actor: dict[str, list[StepEvent]] = defaultdict(list)
    for e in events:
        ts = datetime.fromisoformat(e["timestamp"])
        if start <= ts <= end and e["event"] in STEPS:
            per_actor[e["distinct_id"]].append(StepEvent(ts.timestamp(), e["uuid"], (STEPS.index(e["event"]) + 1,)))
    reached = []
    for evs in per_actor.values():
        result = funnel(evs, len(STEPS), window, order)
        if result is not None and result.steps_reached:
            reached.append(result.steps_reached)
    return [sum(1 for r in reached if r >= k) for k in range(1, len(STEPS) + 1)]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), kill_at=st.floats(0.1, 0.9))
def test_incremental_funnel_equals_direct_evaluation(running: Stack, seed: int, kill_at: float) -> None:
    rng = random.Random(seed)
    project = make_project(running)
    events = []
    for _ in range(600):
        moment = BASE + timedelta(minutes=rng.randrange(6 * 24 * 60))
        events.append({"event": rng.choice([*STEPS, "other"]), "distinct_id": f"a{rng.randrange(40)}",
                       "uuid": str(uuid.uuid4()), "timestamp": moment.isoformat()})
    shuffled = events[:]
    rng.shuffle(shuffled)
    # Register the definitions before half the events exist: the rest arrive live.
    split = int(len(shuffled) * kill_at)
    assert project.capture(shuffled[:split]).status_code == 200
    queries = []
    for _ in range(3):
        first = rng.randrange(5)
        queries.append({
            "events": [{"id": s, "order": i} for i, s in enumerate(STEPS)],
            "date_from": (BASE + timedelta(days=first)).date().isoformat(),
            "date_to": (BASE + timedelta(days=first + rng.randrange(1, 3))).date().isoformat(),
            "funnel_order_type": rng.choice(["ordered", "unordered"]),
            "funnel_window_interval": rng.choice([30, 120, 1440]), "funnel_window_interval_unit": "minute",
        })
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": "2024-08-01T00:00:00Z"}
    url = f"{running.api_url}/api/environments/{project.id}/insights/funnel/"
    for query in queries:
        assert httpx.post(url, json=query, headers=headers, timeout=60).status_code in (200, 202)
    for start in range(split, len(shuffled), 100):
        assert project.capture(shuffled[start:start + 100]).status_code == 200
        if start == split:
            running.restart_dataflow(kill9=True)  # a crash mid-stream, with backfills running
    running.wait_applied(timeout=120)
    for query in queries:
        reply = httpx.post(url, json={**query, "refresh": "blocking"}, headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
        got = [step["count"] for step in reply.json()["result"]]
        start = datetime.fromisoformat(query["date_from"]).replace(tzinfo=UTC)
        end = datetime.fromisoformat(query["date_to"]).replace(tzinfo=UTC) + timedelta(days=1, microseconds=-1)
        window = query["funnel_window_interval"] * 60.0
        assert got == _direct(events, start, end, window, query["funnel_order_type"]), query
