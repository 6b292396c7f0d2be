"""A new definition over existing history, built while capture continues and the dataflow crashes.

At several quiet points the definition's result must equal a from-scratch computation over every
event sent so far: no event lost, none counted twice across the backfill/live handover.
"""

from __future__ import annotations

import random
import uuid

from tests.conftest import ProjectHandle, Stack
from tests.oracle import trend_by_breakdown

DAYS = [f"2024-04-{d:02d}" for d in range(1, 11)]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge", None]


def _events(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        props = {"amount": rng.randrange(0, 100)}
        browser = rng.choice(BROWSERS)
        if browser:
            props["$browser"] = browser
        out.append({"event": rng.choice(["$pageview", "$pageview", "click"]), "uuid": str(uuid.uuid4()),
                    "distinct_id": f"u{rng.randrange(300)}", "properties": props,
                    "timestamp": f"{rng.choice(DAYS)}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"})
    return out


def _send(project: ProjectHandle, events: list[dict], sent: list[dict]) -> None:
    for start in range(0, len(events), 1000):
        chunk = events[start:start + 1000]
        reply = project.capture(chunk)
        assert reply.status_code == 200, reply.text
        sent.extend(chunk)


QUERY = {
    "events": [
        {"id": "$pageview", "properties": [{"key": "amount", "operator": "gt", "value": 50, "type": "event"}]},
        {"id": "$pageview", "math": "dau",
         "properties": [{"key": "amount", "operator": "gt", "value": 50, "type": "event"}]},
    ],
    "breakdown": "$browser", "date_from": DAYS[0], "date_to": DAYS[-1], "breakdown_limit": 10,
}


def _check(project: ProjectHandle, running: Stack, sent: list[dict]) -> None:
    running.wait_applied(timeout=120)
    reply = project.trend({**QUERY, "refresh": "blocking"}, now="2024-04-20T00:00:00Z")
    assert reply.status_code == 200, reply.text
    result = reply.json()["result"]
    totals, uniques = trend_by_breakdown(sent, "$pageview", DAYS, lambda e: e["properties"]["amount"] > 50,
                                         "$browser")
    got_totals = {r["breakdown_value"]: r["data"] for r in result if r["action"]["math"] is None}
    got_uniques = {r["breakdown_value"]: r["data"] for r in result if r["action"]["math"] == "dau"}
    assert got_totals == totals
    assert got_uniques == uniques
    assert all(r["label"].startswith("$pageview - ") for r in result)


def test_definition_backfill_while_capturing(project: ProjectHandle, running: Stack) -> None:
    rng = random.Random(5)
    sent: list[dict] = []
    _send(project, _events(rng, 20_000), sent)  # history before the definition exists
    running.wait_applied(timeout=120)

    first = project.trend(QUERY, now="2024-04-20T00:00:00Z")  # registers the definition
    assert first.status_code in (200, 202), first.text
    if first.status_code == 202:
        body = first.json()
        assert body["status"] == "materializing" and 0.0 <= body["progress"] <= 1.0

    _send(project, _events(rng, 3_000), sent)  # capture continues during the backfill
    running.restart_dataflow(kill9=True)        # and the dataflow crashes mid-way
    _send(project, _events(rng, 3_000), sent)
    _check(project, running, sent)

    for _ in range(2):  # later checkpoints: live path only
        _send(project, _events(rng, 2_000), sent)
        _check(project, running, sent)
    progress = project.trend(QUERY, now="2024-04-20T00:00:00Z")
    assert progress.status_code == 200


def test_a_definition_all_of_whose_partitions_finished_before_a_crash_is_marked_built(
        project: ProjectHandle, running: Stack) -> None:
    """A crash between marking a definition's last partition finished and marking the definition
    built left it pending with nothing left to do: 202 with progress 1.0 for ever. The dataflow now
    takes that last step when it next looks at the pending definitions."""
    import time

    from state import keys
    from state.registry import DefinitionRegistry

    sent: list[dict] = []
    _send(project, _events(random.Random(9), 500), sent)
    running.wait_applied()
    assert project.trend({**QUERY, "refresh": "blocking"}, now="2024-04-20T00:00:00Z").status_code == 200
    registry = DefinitionRegistry(running.redis)
    (h,) = registry.for_project(project.id)
    assert registry.status(project.id, h)[0] == "ready" and registry.done(project.id, h)
    # The state that crash left: every partition done, the definition still pending and building.
    running.redis.hset(keys.definition_meta(keys.definition_prefix(project.id, h)), "status", "backfilling")
    running.redis.sadd(keys.BACKFILLS, f"{project.id}:{h}")
    assert project.trend(QUERY, now="2024-04-20T00:00:00Z").status_code in (200, 202)
    deadline = time.monotonic() + 20
    while registry.status(project.id, h)[0] != "ready":
        assert time.monotonic() < deadline, registry.status(project.id, h)
        time.sleep(0.1)
    assert not running.redis.sismember(keys.BACKFILLS, f"{project.id}:{h}")
    _check(project, running, sent)
