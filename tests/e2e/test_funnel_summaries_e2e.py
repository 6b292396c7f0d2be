"""Ordered funnels answered from attempt summaries: broker -> dataflow -> Redis -> HTTP.

Such a funnel keeps no per-day event lists, so every answer below comes from the attempt rows (and
the stored events of persons with two step events at one instant); each is compared with the UDF run
directly over the events sent.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from dataflows import summariser as summariser_module
from dataflows.operators.funnels import StepEvent, funnel, ordered_attempts
from dataflows.summariser import Summariser
from schemas.registered import load_definition
from serving import stack
from state import keys
from state.registry import DefinitionRegistry
from state.summaries import SummaryStore
from tests.conftest import Stack, make_project

STEPS = ["view", "signup", "pay"]
BASE = datetime(2024, 3, 1, tzinfo=UTC)
NOW = "2024-04-01T00:00:00Z"


def _events(rng: random.Random, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        moment = BASE + timedelta(seconds=rng.randrange(10 * 86400))
        browser = rng.choice(["Chrome", "Safari", "Firefox", None, ""])
        out.append({"event": rng.choice([*STEPS, STEPS[0], "other"]), "distinct_id": f"u{rng.randrange(60)}",
                    "uuid": str(uuid.uuid4()), "timestamp": moment.isoformat(),
                    "properties": {} if browser is None else {"$browser": browser}})
    return out


def _per_person(events: list[dict], start: datetime, end: datetime) -> dict[str, list[StepEvent]]:
    out: dict[str, list[StepEvent]] = defaultdict(list)
    for e in events:
        ts = datetime.fromisoformat(e["timestamp"])
        if start <= ts <= end and e["event"] in STEPS:
            out[e["distinct_id"]].append(StepEvent(ts.timestamp(), e["uuid"], (STEPS.index(e["event"]) + 1,),
                                                   breakdown=(e.get("properties") or {}).get("$browser") or ""))
    return out


def _direct_breakdown(events: list[dict], start: datetime, end: datetime, window: float,
                      attribution: str) -> dict[str, list[int]]:
    """Step counts per browser, each person valued by its first (last) step event with a browser."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for evs in _per_person(events, start, end).values():
        result = funnel(evs, 3, window, "ordered")
        if result is None or not result.steps_reached:
            continue
        valued = [e.breakdown for e in sorted(evs, key=lambda e: (e.ts, e.uuid)) if e.breakdown]
        value = (valued[0] if attribution == "first_touch" else valued[-1]) if valued else ""
        for k in range(result.steps_reached):
            out[value][k] += 1
    return dict(out)


def _direct_steps(events: list[dict], start: datetime, end: datetime, window: float) -> tuple[list[int], float | None]:
    counts, gaps = [0, 0, 0], []
    for evs in _per_person(events, start, end).values():
        result = funnel(evs, 3, window, "ordered")
        if result is None or not result.steps_reached:
            continue
        for k in range(result.steps_reached):
            counts[k] += 1
        if result.steps_reached >= 2 and result.gaps[0] > 0:
            gaps.append(result.gaps[0])
    return counts, (sum(gaps) / len(gaps) if gaps else None)


def test_ordered_funnel_from_attempt_summaries(running: Stack) -> None:
    rng = random.Random(7)
    project = make_project(running)
    events = _events(rng, 1500)
    # One person with two step events at one instant: evaluated by the UDF over its stored events.
    twin = (BASE + timedelta(days=2)).isoformat()
    events += [{"event": "view", "distinct_id": "twin", "uuid": str(uuid.uuid4()), "timestamp": twin},
               {"event": "signup", "distinct_id": "twin", "uuid": str(uuid.uuid4()), "timestamp": twin}]
    assert project.capture(events[:1000]).status_code == 200
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    url = f"{running.api_url}/api/environments/{project.id}/insights/funnel/"
    base = {"events": [{"id": s, "order": i} for i, s in enumerate(STEPS)], "date_from": "2024-03-01",
            "date_to": "2024-03-10", "funnel_window_interval": 2, "funnel_window_interval_unit": "day"}
    assert httpx.post(url, json={**base, "refresh": "blocking"}, headers=headers, timeout=60).status_code == 200
    assert project.capture(events[1000:]).status_code == 200  # the rest arrives live, shuffled in time
    running.wait_applied()

    client = running.redis
    definitions = client.hgetall(keys.definitions(project.id))
    assert len(definitions) == 1
    h = next(iter(definitions)).decode()
    prefix = keys.definition_prefix(project.id, h)
    # A query reads the stored summaries and computes those of persons not summarised yet: it writes
    # nothing (the dataflow's summariser writes them when idle).
    # Asked at once, while persons may still wait for the summariser, the answer is already exact.
    full = (BASE, BASE + timedelta(days=10, microseconds=-1))
    asked = httpx.post(url, json=base, headers=headers, timeout=60).json()["result"]
    assert [s["count"] for s in asked] == _direct_steps(events, *full, 2 * 86400.0)[0]
    deadline = time.monotonic() + 30
    while client.scard(keys.summary_dirty(prefix)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.scard(keys.summary_dirty(prefix)) == 0
    assert client.hkeys(keys.irregular_persons(prefix)) != []
    assert list(client.scan_iter(keys.summary_rows(prefix, "fa", "*"))) != []
    assert list(client.scan_iter(keys.definition_events(prefix, "*"))) == []  # no events kept per day

    for date_from, date_to, window in (("2024-03-01", "2024-03-10", 2), ("2024-03-03", "2024-03-05", 1),
                                       ("2024-03-02", "2024-03-08", 7)):
        body = {**base, "date_from": date_from, "date_to": date_to, "funnel_window_interval": window}
        start = datetime.fromisoformat(date_from).replace(tzinfo=UTC)
        end = datetime.fromisoformat(date_to).replace(tzinfo=UTC) + timedelta(days=1, microseconds=-1)
        steps = httpx.post(url, json=body, headers=headers, timeout=60).json()["result"]
        counts, average = _direct_steps(events, start, end, window * 86400.0)
        assert [s["count"] for s in steps] == counts, body
        assert steps[1]["average_conversion_time"] == (None if average is None else
                                                       pytest.approx(average, rel=1e-9))
        dropped = httpx.get(steps[1]["dropped_people_url"], headers=headers, timeout=60).json()["results"][0]
        assert dropped["count"] == counts[0] - counts[1]

        trends = httpx.post(url, json={**body, "funnel_viz_type": "trends"}, headers=headers, timeout=60)
        entered = defaultdict(set)
        converted = defaultdict(set)
        for person, evs in _per_person(events, start, end).items():
            for moment, reached in ordered_attempts(evs, 3, window * 86400.0, "ordered") or []:
                day = datetime.fromtimestamp(moment, UTC).date()
                entered[day].add(person)
                if reached >= 3:
                    converted[day].add(person)
        result = trends.json()["result"][0]
        days = [datetime.fromisoformat(d).date() for d in result["days"]]
        assert result["reached_from_step_count"] == [len(entered[d]) for d in days]
        assert result["reached_to_step_count"] == [len(converted[d]) for d in days]

    # A late event, earlier than everything else of its person: the next answer includes it.
    late = {"event": "pay", "distinct_id": "u1", "uuid": str(uuid.uuid4()),
            "timestamp": (BASE + timedelta(days=9, hours=23)).isoformat()}
    events.append(late)
    assert project.capture([late]).status_code == 200
    running.wait_applied()
    start, end = BASE, BASE + timedelta(days=10, microseconds=-1)
    steps = httpx.post(url, json=base, headers=headers, timeout=60).json()["result"]
    assert [s["count"] for s in steps] == _direct_steps(events, start, end, 2 * 86400.0)[0]


def test_broken_down_funnel_from_touches(running: Stack) -> None:
    """First/last-touch breakdowns over whole days come from the per-day touches; a range that does
    not start and end on day boundaries (explicit_date) takes the event path the definition also keeps.
    Both equal the UDF."""
    rng = random.Random(11)
    project = make_project(running)
    events = _events(rng, 1500)
    assert project.capture(events[:700]).status_code == 200
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    url = f"{running.api_url}/api/environments/{project.id}/insights/funnel/"
    base = {"events": [{"id": s, "order": i} for i, s in enumerate(STEPS)], "date_from": "2024-03-01",
            "date_to": "2024-03-10", "funnel_window_interval": 2, "funnel_window_interval_unit": "day",
            "breakdown": "$browser", "breakdown_type": "event"}
    assert httpx.post(url, json={**base, "refresh": "blocking"}, headers=headers, timeout=60).status_code == 200
    assert project.capture(events[700:]).status_code == 200
    running.wait_applied()
    for attribution in ("first_touch", "last_touch"):
        for date_from, date_to, explicit in (("2024-03-02", "2024-03-10", False),
                                             ("2024-03-02", "2024-03-10T11:59:59", True),
                                             ("2024-03-02T12:00:00", "2024-03-10T23:59:59", True)):
            body = {**base, "breakdown_attribution_type": attribution, "date_from": date_from,
                    "date_to": date_to, "explicit_date": explicit}
            reply = httpx.post(url, json={**body, "refresh": "blocking"}, headers=headers, timeout=60)
            assert reply.status_code == 200, reply.text
            got = {step[0]["breakdown_value"][0]: [s["count"] for s in step] for step in reply.json()["result"]}
            start = datetime.fromisoformat(date_from).replace(tzinfo=UTC)
            end = (datetime.fromisoformat(date_to).replace(tzinfo=UTC) if explicit
                   else BASE + timedelta(days=10, microseconds=-1))
            assert got == _direct_breakdown(events, start, end, 2 * 86400.0, attribution), body
            ranked = [v for v in (step[0]["breakdown_value"][0] for step in reply.json()["result"]) if v]
            # PostHog's order: the last step's count, then the entrants', then the value (issue 12)
            assert ranked == sorted(ranked, key=lambda v: (-got[v][-1], -got[v][0], v))


def test_a_backlog_is_applied_before_its_persons_are_summarised(running: Stack) -> None:
    """While the live input is more than `INSIGHTFLOW_SUMMARIES_WAIT_LAG` events behind, a ready
    funnel's summaries wait (a person touched by many batches of a backlog is summarised once after
    it, not once per batch); the answers are exact throughout, and once the backlog is applied every
    person is summarised (many at once, over columns, merged persons with their group)."""
    rng = random.Random(11)
    project = make_project(running)
    events = [{**e, "distinct_id": f"b{rng.randrange(600)}"} for e in _events(rng, 16_000)]
    # Persons seen anonymously and signed in before the backlog, aliased in it: merged persons, whose
    # summaries are made from their group's events (and the anonymous person's emptied).
    aliased = []
    for k in range(0, 600, 3):
        mine = [e for e in events[:1000] if e["distinct_id"] == f"b{k}"]
        if len(mine) >= 2:
            mine[0]["distinct_id"] = f"anon-b{k}"
            aliased.append(k)
            events.append({"event": "$create_alias", "distinct_id": f"b{k}", "uuid": str(uuid.uuid4()),
                           "timestamp": (BASE + timedelta(days=5)).isoformat(), "properties": {"alias": f"anon-b{k}"}})
    assert len(aliased) > 30
    as_persons = [{**e, "distinct_id": e["distinct_id"].removeprefix("anon-")} for e in events]
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    url = f"{running.api_url}/api/environments/{project.id}/insights/funnel/"
    base = {"events": [{"id": s, "order": i} for i, s in enumerate(STEPS)], "date_from": "2024-03-01",
            "date_to": "2024-03-10", "funnel_window_interval": 3, "funnel_window_interval_unit": "day"}
    assert project.capture(events[:1000]).status_code == 200
    assert httpx.post(url, json={**base, "refresh": "blocking"}, headers=headers, timeout=60).status_code == 200
    running.wait_applied()
    client = running.redis
    (h,) = [d.decode() for d in client.hgetall(keys.definitions(project.id))]
    dirty = keys.summary_dirty(keys.definition_prefix(project.id, h))

    def summarised(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while client.scard(dirty) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.scard(dirty) == 0

    summarised(30)
    full = (BASE, BASE + timedelta(days=10, microseconds=-1))
    running.dataflow.stop()  # the rest piles up in the topic: a backlog of 15,000 events
    log = running.dataflow.log_path
    assert log is not None
    seen = log.stat().st_size
    try:
        for start in range(1000, len(events), 1000):
            assert project.capture(events[start:start + 1000]).status_code == 200
        running.dataflow = stack.start_dataflow(running.recovery_dir, running.logs,
                                                {**running.env, "INSIGHTFLOW_SUMMARIES_WAIT_LAG": "2000"})
        running.wait_applied(timeout=120)
        asked = httpx.post(url, json=base, headers=headers, timeout=60).json()["result"]
        assert [s["count"] for s in asked] == _direct_steps(as_persons, *full, 3 * 86400.0)[0]
        summarised(60)
        told = log.read_bytes()[seen:].decode(errors="replace")
        assert "summaries of ready definitions wait while the live input is" in told, told[-3000:]
        assert "the live input caught up" in told, told[-3000:]
        prefix = keys.definition_prefix(project.id, h)
        assert client.hlen(keys.summary_rows(prefix, "fa", "20240305")) > 0
        merged = client.hkeys(keys.merged(project.id))  # the anonymous persons, merged into the users'
        assert len(merged) == len(aliased)
        row_days = list(client.scan_iter(keys.summary_rows(prefix, "fa", "*")))
        assert row_days and not any(client.hexists(day, person) for day in row_days for person in merged)
        again = httpx.post(url, json=base, headers=headers, timeout=60).json()["result"]
        assert [s["count"] for s in again] == [s["count"] for s in asked]
    finally:
        running.dataflow.stop()
        running.dataflow = stack.start_dataflow(running.recovery_dir, running.logs, running.env)


def _unsummarise(client: Any, project_id: int, definition: Any, persons: list[str], shards: int) -> None:
    """Back to the state of a definition none of whose persons was summarised yet (every person
    dirty, no summary rows, each day's version moved so no cached read stands), in one transaction
    per state shard."""
    prefix = keys.definition_prefix(project_id, definition.hash)
    for shard in range(shards):
        mine = [p for p in persons if keys.shard_of(p, shards) == shard]
        pipe = client.pipeline(transaction=True)
        for kind in ("fa", "fb"):  # the days a version names are the days with rows (no SCAN of a shared Redis)
            versions = keys.in_shard(keys.summary_versions(prefix, kind), shard)
            for day in client.hkeys(versions):
                pipe.hincrby(versions, day, 1)
                pipe.delete(keys.in_shard(keys.summary_rows(prefix, kind, day.decode()), shard))
        pipe.delete(keys.in_shard(keys.irregular_persons(prefix), shard))
        if mine:
            pipe.sadd(keys.in_shard(keys.summary_dirty(prefix), shard), *mine)
        pipe.execute()


def test_answers_stay_exact_while_the_summariser_writes(running: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A query reads the dirty persons, then the stored summaries: a person the summariser writes in
    between is in both, and the stored part is replaced by what the query computed. (Read the other
    way round, it was in neither: a project whose persons were all summarised meanwhile answered no
    groups at all.) Each round puts the funnels back to "nobody summarised yet" and asks them while
    a summariser writes the persons one by one; every answer equals the UDF."""
    rng = random.Random(5)
    project = make_project(running)
    events = _events(rng, 1200)
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    url = f"{running.api_url}/api/environments/{project.id}/insights/funnel/"
    base = {"events": [{"id": s, "order": i} for i, s in enumerate(STEPS)], "date_from": "2024-03-01",
            "date_to": "2024-03-10", "funnel_window_interval": 2, "funnel_window_interval_unit": "day"}
    by_browser = {**base, "breakdown": "$browser", "breakdown_type": "event"}
    for body in (base, by_browser):
        assert httpx.post(url, json={**body, "refresh": "blocking"}, headers=headers, timeout=60).status_code == 200
    assert project.capture(events).status_code == 200
    running.wait_applied()
    full = (BASE, BASE + timedelta(days=10, microseconds=-1))
    steps = _direct_steps(events, *full, 2 * 86400.0)[0]
    browsers = _direct_breakdown(events, *full, 2 * 86400.0, "first_touch")

    client = running.redis
    registry = DefinitionRegistry(client)
    definitions = [load_definition(registry.get(project.id, h.decode()))
                   for h in client.hkeys(keys.definitions(project.id))]
    assert len(definitions) == 2
    store = SummaryStore(client)
    summariser = Summariser(store, lambda letters: None)
    deadline = time.monotonic() + 30
    while any(store.pending(project.id, d.hash) for d in definitions):  # the dataflow summarised them all
        assert time.monotonic() < deadline
        time.sleep(0.1)
    persons = sorted({p.decode() for d in definitions for shard in range(store.shards) for kind in ("fa", "fb")
                      for day in client.hkeys(keys.in_shard(keys.summary_versions(
                          keys.definition_prefix(project.id, d.hash), kind), shard))
                      for p in client.hkeys(keys.in_shard(keys.summary_rows(
                          keys.definition_prefix(project.id, d.hash), kind, day.decode()), shard))})
    assert len(persons) > 40
    written = [0]

    def summarise_one_by_one() -> None:
        for person in persons:
            for definition in definitions:
                written[0] += summariser.summarise(definition, [person])

    for _ in range(30):
        for definition in definitions:
            _unsummarise(client, project.id, definition, persons, store.shards)
        writer = threading.Thread(target=summarise_one_by_one)
        writer.start()
        try:
            asked = httpx.post(url, json=base, headers=headers, timeout=60).json()["result"]
            assert [s["count"] for s in asked] == steps
            grouped = httpx.post(url, json=by_browser, headers=headers, timeout=60).json()["result"]
            assert {g[0]["breakdown_value"][0]: [s["count"] for s in g] for g in grouped} == browsers
        finally:
            writer.join()
    assert written[0] > 0  # the answers above were asked while summaries were being written

    # Many persons at once: written in slices, each while the next is summarised.
    monkeypatch.setattr(summariser_module, "SLICE", 7)
    for definition in definitions:
        _unsummarise(client, project.id, definition, persons, store.shards)
        assert summariser.summarise(definition, persons) == len(persons)
        assert store.pending(project.id, definition.hash) == 0
    asked = httpx.post(url, json=base, headers=headers, timeout=60).json()["result"]
    assert [s["count"] for s in asked] == steps
    grouped = httpx.post(url, json=by_browser, headers=headers, timeout=60).json()["result"]
    assert {g[0]["breakdown_value"][0]: [s["count"] for s in g] for g in grouped} == browsers
