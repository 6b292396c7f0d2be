"""The live write path over a backlog of many chunks. Chunks are applied by a thread, in order, while
the worker plans the chunks and batches behind them (dataflows/flow.py): every event counts once
when chunks are refused in part (resent copies, a replay of what Redis holds, definitions registered
meanwhile) with others queued behind. A definition that reads person properties sees those every
earlier event of the backlog set, even when they were set in an earlier chunk of the same batch
(for it, a chunk is planned after the previous one is in), and never the old value a resent or
replayed copy carries."""

from __future__ import annotations

import random
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from serving import stack
from tests.conftest import ProjectHandle, Stack, make_project

BASE = datetime(2024, 5, 1, tzinfo=UTC)
NOW = "2024-06-01T00:00:00Z"


def _backlog(rng: random.Random, n: int, persons: int) -> list[dict[str, Any]]:
    """`n` purchases in time order; one in twelve also sets the buyer's plan. One in forty is followed
    later by an SDK resend of an earlier purchase that set a plan (same uuid and time): it counts
    once, and its old plan must not reach the purchases between."""
    events: list[dict[str, Any]] = []
    setting: list[dict[str, Any]] = []
    for i in range(n):
        properties: dict[str, Any] = {"amount": rng.randrange(100)}
        if rng.random() < 1 / 12:
            properties["$set"] = {"plan": rng.choice(["pro", "free"])}
        events.append({"event": "buy", "distinct_id": f"w{rng.randrange(persons)}", "uuid": str(uuid.uuid4()),
                       "timestamp": (BASE + timedelta(seconds=60 * i)).isoformat(), "properties": properties})
        if "$set" in properties:
            setting.append(events[-1])
        if setting and rng.random() < 1 / 40:
            events.append(dict(rng.choice(setting)))
    return events


def _pro_purchases(events: list[dict[str, Any]]) -> int:
    """Purchases made while the buyer's plan was `pro`, the purchase's own `$set` included; a resent
    copy is the purchase it repeats."""
    plan: dict[str, str] = {}
    count = 0
    seen: set[str] = set()
    for e in events:
        if e["uuid"] in seen:
            continue
        seen.add(e["uuid"])
        plan.update({e["distinct_id"]: e["properties"]["$set"]["plan"]} if "$set" in e["properties"] else {})
        count += plan.get(e["distinct_id"]) == "pro"
    return count


def _backlog_behind_an_older_snapshot(running: Stack, project: ProjectHandle, older: Path, rest: list[dict[str, Any]]
                                      ) -> tuple[Path, int]:
    """Stop the dataflow, put the `older` recovery snapshot back (what a kill -9 can leave), capture
    `rest` while it is down (a backlog: batches of several chunks each) and start it again. Returns
    its log and where this run's lines begin."""
    running.dataflow.stop()
    shutil.rmtree(running.recovery_dir)
    shutil.copytree(older, running.recovery_dir)
    for start in range(0, len(rest), 1000):
        assert project.capture(rest[start:start + 1000]).status_code == 200
    log_path = running.dataflow.log_path
    logged = log_path.stat().st_size if log_path.exists() else 0
    running.dataflow = stack.start_dataflow(running.recovery_dir, running.logs, running.env)
    return log_path, logged


def test_person_properties_set_earlier_in_a_backlog_reach_later_chunks(running: Stack, tmp_path: Path) -> None:
    """After a restart from a recovery snapshot older than Redis (what a kill -9 leaves), the backlog
    begins with events applied already: their batch passes the home part (the same copies) and
    state shards refuse what they hold, so each such chunk is planned twice; the second plan must
    see persons as they were before the chunk, not as its applied home part left them."""
    rng = random.Random(5)
    project = make_project(running)
    events = _backlog(rng, 9000, 150)
    query = {"events": [{"id": "buy"}], "date_from": "2024-05-01", "date_to": "2024-05-10",
             "properties": [{"key": "plan", "value": "pro", "type": "person"}]}
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    url = f"{running.api_url}/api/environments/{project.id}/insights/trend/"
    # Registered before any event (a backfill attaches person properties as they are at its time):
    # every purchase is then applied live.
    registered = httpx.post(url, json={**query, "refresh": "blocking"}, headers=headers, timeout=60)
    assert registered.status_code == 200 and registered.json()["result"][0]["count"] == 0
    running.dataflow.stop()
    try:
        shutil.copytree(running.recovery_dir, tmp_path / "older")  # before any event of the project
        running.dataflow = stack.start_dataflow(running.recovery_dir, running.logs, running.env)
        assert project.capture(events[:500]).status_code == 200
        running.wait_applied()
        assert httpx.post(url, json=query, headers=headers, timeout=60).json()["result"][0]["count"] == (
            _pro_purchases(events[:500]))
        log_path, logged = _backlog_behind_an_older_snapshot(running, project, tmp_path / "older", events[500:])
        running.wait_applied(timeout=120)
        answer = httpx.post(url, json=query, headers=headers, timeout=60)
        assert answer.status_code == 200
        expected = _pro_purchases(events)
        assert expected > 1000
        assert answer.json()["result"][0]["count"] == expected
        with log_path.open() as log:  # the case was met
            assert "holds part of a replayed batch" in log.read()[logged:]
    finally:
        if not running.dataflow.alive():
            running.dataflow = stack.start_dataflow(running.recovery_dir, running.logs, running.env)


def _daily(events: list[dict[str, Any]], name: str, keep: Any = lambda e: True) -> tuple[list[int], list[int]]:
    """Per day of May 1-10, the events named `name` that `keep` keeps and their distinct persons, each
    uuid once (a resent copy is the event it repeats)."""
    counts, persons, seen = [0] * 10, [set() for _ in range(10)], set()
    for e in events:
        if e["uuid"] in seen:
            continue
        seen.add(e["uuid"])
        if e["event"] == name and keep(e):
            day = datetime.fromisoformat(e["timestamp"]).day - 1
            counts[day] += 1
            persons[day].add(e["distinct_id"])
    return counts, [len(p) for p in persons]


def test_chunks_applied_ahead_of_planning_count_each_event_once(running: Stack, tmp_path: Path) -> None:
    """A backlog of many batches, resumed from a recovery snapshot older than Redis: its first chunks
    are refused in part by state shards (they hold them) and the backlog's resent copies by their
    guards, while later chunks wait in the apply queue; a filtered trend registered while the backlog
    is applied is refused as outdated by the chunks planned before it. Every count equals one pass
    over the events, each uuid once."""
    rng = random.Random(11)
    project = make_project(running)
    events = _backlog(rng, 12000, 200)
    for e in events:
        if rng.random() < 0.5:
            e["event"] = "view"
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    url = f"{running.api_url}/api/environments/{project.id}/insights/trend/"
    window = {"date_from": "2024-05-01", "date_to": "2024-05-10", "interval": "day"}
    daily = {**window, "events": [{"id": "buy"}, {"id": "view", "math": "dau"}]}
    running.dataflow.stop()
    try:
        shutil.copytree(running.recovery_dir, tmp_path / "older")
        running.dataflow = stack.start_dataflow(running.recovery_dir, running.logs, running.env)
        assert project.capture(events[:3000]).status_code == 200
        running.wait_applied()
        log_path, logged = _backlog_behind_an_older_snapshot(running, project, tmp_path / "older", events[3000:])
        filtered = {**window, "events": [{"id": "view", "math": "dau"}],
                    "properties": [{"key": "amount", "value": 50, "operator": "gte", "type": "event"}]}
        built = httpx.post(url, json={**filtered, "refresh": "blocking"}, headers=headers, timeout=120)
        running.wait_applied(timeout=120)
        buys, _ = _daily(events, "buy")
        views, viewers = _daily(events, "view")
        _, big_viewers = _daily(events, "view", lambda e: e["properties"]["amount"] >= 50)
        answer = httpx.post(url, json=daily, headers=headers, timeout=60).json()["result"]
        assert [answer[0]["data"], answer[1]["data"]] == [buys, viewers]
        assert sum(buys) + sum(views) == len({e["uuid"] for e in events}) < len(events)
        assert built.status_code == 200
        assert httpx.post(url, json=filtered, headers=headers, timeout=60).json()["result"][0]["data"] == big_viewers
        with log_path.open() as log:  # the refusals were met
            assert "holds part of a replayed batch" in log.read()[logged:]
    finally:
        if not running.dataflow.alive():
            running.dataflow = stack.start_dataflow(running.recovery_dir, running.logs, running.env)
