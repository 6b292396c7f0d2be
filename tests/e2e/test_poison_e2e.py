"""Events and definitions that used to stop ingestion for every project (issue: poison probes).

Each is refused at the door with a clear 4xx, dead-lettered with its reason when it arrives another
way (straight onto the topic, or already stored by an older version), or fails only its own
definition; meanwhile every other project's events keep being applied within seconds, and a
restarted dataflow does not meet the poison again.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Producer

from schemas.funnels import parse_funnel_request
from state import keys
from state.records import kept_block
from state.registry import DefinitionRegistry
from tests import legacy
from tests.conftest import ProjectHandle, Stack, make_project

pytestmark = pytest.mark.e2e

DAY = "2024-03-05"
NOW = "2024-04-01T00:00:00Z"


def _events(name: str, count: int, distinct_id: str = "p1", day: str = DAY) -> list[dict[str, Any]]:
    return [{"event": name, "distinct_id": distinct_id, "uuid": str(uuid.uuid4()),
             "timestamp": f"{day}T10:{i // 60:02d}:{i % 60:02d}Z"} for i in range(count)]


def _count(running: Stack, project_id: int, event: str) -> int:
    return sum(int(v) for v in running.redis.hgetall(keys.day_counts(project_id, event)).values())


def _bystander_applied(running: Stack, label: str) -> None:
    """Another project's events are applied within seconds: ingestion did not stop."""
    other = make_project(running)
    reply = other.capture(_events(label, 25))
    assert reply.status_code == 200, reply.text
    started = time.monotonic()
    running.wait_applied(timeout=20)
    assert _count(running, other.id, label) == 25
    assert time.monotonic() - started < 20
    assert running.dataflow.alive()


def _produce(running: Stack, *records: dict[str, Any]) -> None:
    producer = Producer({"bootstrap.servers": running.services.bootstrap})
    for record in records:
        producer.produce("events", key=f"{record['project_id']}:{record['distinct_id']}".encode(),
                         value=orjson.dumps(record))
    assert producer.flush(10) == 0


def _letter(running: Stack, needle: str) -> dict[str, str]:
    found = running.dead_letters(lambda got: any(needle.encode() in value for value, _ in got))
    matching = [headers for value, headers in found if needle.encode() in value]
    assert matching, f"no dead letter containing {needle!r}"
    return matching[0]


def test_a_time_before_year_one_in_a_western_zone(running: Stack) -> None:
    """(a) `0001-01-01T00:00:00` in America/New_York has no local date: refused by capture with its
    index, dead-lettered when produced straight onto the topic."""
    project = make_project(running, timezone="America/New_York")
    batch = [*_events("fine", 2), {"event": "poison", "distinct_id": "p1", "timestamp": "0001-01-01T00:00:00"}]
    reply = project.capture(batch)
    assert reply.status_code == 400
    body = reply.json()
    assert body["accepted"] == 2 and [r["index"] for r in body["rejected"]] == [2]
    assert "outside 1900-01-01 .. 2199-12-31" in body["rejected"][0]["detail"]

    before = running.readyz()["dlq_events"]
    marker = str(uuid.uuid4())
    _produce(running, {"event": "poison", "distinct_id": "p1", "project_id": project.id, "uuid": marker,
                       "timestamp": "0001-01-01T00:00:00"})
    _bystander_applied(running, "after-a")
    assert "outside 1900-01-01" in _letter(running, marker)["reason"]
    assert running.readyz()["dlq_events"] >= before + 1
    assert _count(running, project.id, "fine") == 2 and _count(running, project.id, "poison") == 0


def _funnel(project: ProjectHandle, steps: list[str], **extra: Any) -> httpx.Response:
    query = {"events": [{"id": s, "order": i} for i, s in enumerate(steps)], "date_from": "2024-03-01",
             "date_to": "2024-03-10", "refresh": "blocking", **extra}
    return httpx.post(f"{project.stack.api_url}/api/environments/{project.id}/insights/funnel/", json=query,
                      headers={"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}, timeout=60)


def test_funnel_step_events_far_in_the_past_and_kept_ones_from_an_older_version(running: Stack) -> None:
    """(b) A step event of 1600 (or `offset: -1e13`) under an ordered funnel: its attempt row would
    not fit an int64. Capture refuses 1600 and clamps the offset to now; one already kept by an older
    version is dropped by the summariser and dead-lettered, and the funnel still answers."""
    project = make_project(running)
    first = _funnel(project, ["view", "buy"])
    assert first.status_code == 200, first.text
    reply = project.capture([{"event": "view", "distinct_id": "p1", "timestamp": "1600-01-01T00:00:00Z"},
                             {"event": "view", "distinct_id": "p1", "offset": -1e13}])
    assert reply.status_code == 400 and reply.json()["accepted"] == 1
    assert [r["index"] for r in reply.json()["rejected"]] == [0]
    assert project.capture(_events("view", 1, "p1") + _events("buy", 1, "p1", "2024-03-06")).status_code == 200
    running.wait_applied()
    today = time.strftime("%Y%m%d", time.gmtime())
    assert int(running.redis.hget(keys.day_counts(project.id, "view"), today) or 0) == 1  # the offset one: now

    # A kept event from before the range check: dated 1600, waiting to be summarised.
    definition = parse_funnel_request({"events": [{"id": "view", "order": 0}, {"id": "buy", "order": 1}]},
                                      project.id, "UTC", []).definition
    prefix = keys.definition_prefix(project.id, definition.hash)
    person = running.redis.hget(keys.distinct_ids(project.id), "p1").decode()
    marker = str(uuid.uuid4())
    value = orjson.dumps([0b10, 0, ""])
    # One in the string an older version kept per definition (as for a definition registered before
    # the kept logs), one in the person's kept log.
    running.redis.hdel(keys.definition_meta(prefix), "kept")
    older = str(uuid.uuid4())
    running.redis.append(keys.person_events(prefix, person),
                         b"-11676096000000,16000101,%s,%d:%s" % (older.encode(), len(value), value))
    log = keys.kept_log(project.id, 0, person)
    running.redis.append(log, kept_block(definition.hash, b"-11676096000000,16000101,%s,%d:%s" % (
        marker.encode(), len(value), value)))
    running.redis.sadd(keys.summary_dirty(prefix), person)

    for dropped in (older, marker):
        letter = _letter(running, dropped)
        assert "outside the range events can have" in letter["reason"] and letter["source"] == "summariser"
    assert running.redis.get(keys.person_events(prefix, person)) is None
    assert marker.encode() not in (running.redis.get(log) or b"")
    _bystander_applied(running, "after-b")
    steps = _funnel(project, ["view", "buy"]).json()["result"]
    assert [s["count"] for s in steps] == [1, 1]


def test_a_funnel_of_64_steps(running: Stack) -> None:
    """(c) 64 steps overflow the 64-bit step mask: refused (PostHog's limit is 32) even for a key that
    may only read; one stored by an older version is marked failed, answers why, and events flow."""
    project = make_project(running)
    refused = _funnel(project, [f"s{i}" for i in range(64)])
    assert refused.status_code == 400, refused.text
    assert "at most 32 steps; this one has 64" in refused.json()["detail"]
    assert _funnel(project, [f"s{i}" for i in range(32)]).status_code == 200

    h, stored = legacy.funnel_definition(project.id, 64)
    client = running.redis
    legacy.register(client, project.id, h, stored)
    assert project.capture(_events("s0", 3) + _events("s1", 3)).status_code == 200
    running.wait_applied()
    _bystander_applied(running, "after-c")
    assert _count(running, project.id, "s0") == 3
    registry = DefinitionRegistry(client)
    deadline = time.monotonic() + 10
    while registry.failure(project.id, h) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "at most 32 steps; this one has 64" in (registry.failure(project.id, h) or "")
    assert registry.status(project.id, h)[0] == "failed"

    # A restarted dataflow meets the stored definition again and goes on.
    running.restart_dataflow(kill9=True)
    assert project.capture(_events("s0", 2, "p2")).status_code == 200
    running.wait_applied()
    assert _count(running, project.id, "s0") == 5
    _bystander_applied(running, "after-c-restart")


def test_a_sum_past_the_float_range(running: Stack) -> None:
    """A property sum past the largest double stops nothing and does not depend on batching: the day's
    sum is infinite, answered as null (JSON has no infinity), whether the events came together or not."""
    project = make_project(running)
    query = {"events": [{"id": "huge", "math": "sum", "math_property": "v"}], "date_from": "2024-03-04",
             "date_to": "2024-03-06", "refresh": "blocking"}
    assert project.trend(query, now=NOW).status_code == 200
    together = [{**e, "properties": {"v": 1.5e308}} for e in _events("huge", 2, day="2024-03-04")]
    assert project.capture(together).status_code == 200
    for e in _events("huge", 2, day="2024-03-05"):
        assert project.capture([{**e, "properties": {"v": 1.5e308}}]).status_code == 200
        running.wait_applied()
    _bystander_applied(running, "after-sum")
    answer = project.trend(query, now=NOW)
    assert answer.status_code == 200, answer.text
    assert answer.json()["result"][0]["data"] == [None, None, 0.0]
    total = project.trend({**query, "events": [{"id": "huge"}]}, now=NOW)
    assert total.json()["result"][0]["data"] == [2, 2, 0]
