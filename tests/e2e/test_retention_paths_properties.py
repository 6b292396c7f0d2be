"""Retention matrices and path edges from incremental state equal a direct batch evaluation, for
random streams sent in shuffled order with the dataflow killed (kill -9) mid-stream."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Stack, make_project
from tests.oracle import default_paths

BASE = datetime(2024, 9, 1, tzinfo=UTC)
PAGES = ["/", "/docs", "/pricing", "/signup"]


def _retention_oracle(events: list[dict], days: int) -> list[list[int]]:
    """Daily recurring retention of $pageview over `days` days from BASE."""
    active: dict[int, set[str]] = defaultdict(set)
    for e in events:
        if e["event"] == "$pageview":
            active[(datetime.fromisoformat(e["timestamp"]) - BASE).days].add(e["distinct_id"])
    return [[len(active[c])] + [len(active[c] & active[c + k]) for k in range(1, days - c)] for c in range(days)]


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), kill_at=st.floats(0.2, 0.8))
def test_retention_and_paths_match_batch(running: Stack, seed: int, kill_at: float) -> None:
    rng = random.Random(seed)
    project = make_project(running)
    days = 6
    events = []
    for _ in range(400):
        moment = BASE + timedelta(days=rng.randrange(days), minutes=rng.randrange(0, 24 * 60, 7))
        name = rng.choice(["$pageview", "$pageview", "other"])
        events.append({"event": name, "distinct_id": f"r{rng.randrange(30)}", "uuid": str(uuid.uuid4()),
                       "timestamp": moment.isoformat(), "properties": {"$current_url": rng.choice(PAGES)}})
    shuffled = events[:]
    rng.shuffle(shuffled)
    split = int(len(shuffled) * kill_at)
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": "2024-10-01T00:00:00Z"}
    api = f"{running.api_url}/api/environments/{project.id}/insights"
    retention = {"period": "Day", "total_intervals": days, "date_to": (BASE + timedelta(days=days - 1)).isoformat()}
    paths = {"include_event_types": ["$pageview"], "date_from": BASE.date().isoformat(),
             "date_to": (BASE + timedelta(days=days)).date().isoformat(), "edge_limit": 1000}
    assert project.capture(shuffled[:split]).status_code == 200
    assert httpx.post(f"{api}/path/", json=paths, headers=headers, timeout=60).status_code in (200, 202)
    for start in range(split, len(shuffled), 80):
        assert project.capture(shuffled[start:start + 80]).status_code == 200
        if start == split:
            running.restart_dataflow(kill9=True)
    running.wait_applied(timeout=120)
    rows = httpx.post(f"{api}/retention/", json=retention, headers=headers, timeout=60).json()["result"]
    assert [[v["count"] for v in row["values"]] for row in rows] == _retention_oracle(events, days)
    edges = httpx.post(f"{api}/path/", json={**paths, "refresh": "blocking"}, headers=headers, timeout=60).json()
    expected = default_paths(events, lambda e: e["distinct_id"])
    assert {(e["source"], e["target"]): e["value"] for e in edges["result"]} == expected
