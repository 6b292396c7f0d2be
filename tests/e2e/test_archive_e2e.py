"""History outlives the broker: definitions asked for after the embedded broker lost its topics (a
restart of the whole stack, or a topic deleted and recreated) are built from the event archive the
dataflow writes, and equal a batch computation over every event ever accepted.

Each test runs its own `insightflow up` on a temporary data dir, so the topics it loses are its own.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from dataflows.definitions import person_snapshot
from dataflows.operators.funnels import StepEvent, funnel
from state.archive import Archive
from state.registry import Registry
from state.topics import ensure_topics, topic_id
from tests.e2e.test_merge_properties import BASE, DAYS, LINKS, ORDERED, PATHS, RANGE, Api, final_persons, oracle, stream
from tests.oracle import default_paths
from tests.upstack import Up

pytestmark = pytest.mark.e2e
CLOCK = {"INSIGHTFLOW_TEST_CLOCK": "1"}


def _project(up: Up, project_id: int) -> tuple[str, Api]:
    registry = Registry(up.redis)
    token = f"phc_archive_{project_id}"
    registry.save_project(project_id, token=token)
    key, _ = registry.create_key([project_id], ["insight:read", "insight:write"])
    return token, Api(up.url, project_id, key)


def _capture(up: Up, token: str, events: list[dict[str, Any]], batch: int = 100, pause: float = 0.0) -> None:
    with httpx.Client(timeout=30) as client:
        for start in range(0, len(events), batch):
            reply = client.post(f"{up.url}/batch/", json={"api_key": token, "batch": events[start:start + batch]})
            assert reply.status_code == 200, reply.text
            time.sleep(pause)


def _renamed(events: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """The same flows for other people: every distinct id (and the ids links name) prefixed."""
    out = []
    for e in events:
        props = dict(e["properties"])
        for name in ("alias", "$anon_distinct_id"):
            if name in props:
                props[name] = prefix + props[name]
        out.append({**e, "distinct_id": prefix + e["distinct_id"], "properties": props})
    return out


def _day(e: dict[str, Any]) -> int:
    return (datetime.fromisoformat(e["timestamp"]) - BASE).days


def _filtered_trend(events: list[dict[str, Any]], person: dict[str, str], browser: str) -> list[list[int]]:
    """$pageview events with `$browser` = browser: total and distinct persons per day."""
    totals, persons = [0] * DAYS, [set() for _ in range(DAYS)]
    for e in events:
        if e["event"] == "$pageview" and e["properties"].get("$browser") == browser:
            totals[_day(e)] += 1
            persons[_day(e)].add(person[e["distinct_id"]])
    return [totals, [len(p) for p in persons]]


def _two_step_funnel(events: list[dict[str, Any]], person: dict[str, str], order: str = "ordered",
                     first: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[int]:
    """$pageview (those `first` keeps) -> purchase, 7-day window (a strict funnel sees the person's
    other events too)."""
    steps: dict[str, list[StepEvent]] = defaultdict(list)
    for e in events:
        ts = datetime.fromisoformat(e["timestamp"]).timestamp()
        if e["event"] == "$pageview" and not first(e):
            if order == "strict":
                steps[person[e["distinct_id"]]].append(StepEvent(ts, e["uuid"], ()))
        elif e["event"] in ("$pageview", "purchase"):
            steps[person[e["distinct_id"]]].append(StepEvent(ts, e["uuid"], (1 if e["event"] == "$pageview" else 2,)))
        elif order == "strict":
            steps[person[e["distinct_id"]]].append(StepEvent(ts, e["uuid"], ()))
    reached = [r.steps_reached for found in steps.values() if (r := funnel(found, 2, 7 * 86400, order))]
    return [sum(1 for r in reached if r >= k) for k in (1, 2)]


def _priced(events: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Purchases with an `amount`: a number, a number as text, text that is none, or nothing."""
    for e in events:
        if e["event"] == "purchase":
            choice = rng.choice([rng.randrange(1, 100), rng.randrange(1, 10) / 4, "12.5", "n/a", None])
            if choice is not None:
                e["properties"]["amount"] = choice
    return events


def _amounts(events: list[dict[str, Any]]) -> list[list[float]]:
    """Per day: the sum and the average of the purchases' numeric amounts (0 without any)."""
    by_day: list[list[float]] = [[] for _ in range(DAYS)]
    for e in events:
        amount = e["properties"].get("amount")
        if e["event"] == "purchase" and amount is not None and amount != "n/a":
            by_day[_day(e)].append(float(amount))
    return [[sum(v) for v in by_day], [sum(v) / len(v) if v else 0 for v in by_day]]


def _ask_amounts(api: Api) -> list[list[float]]:
    series = [{"id": "purchase", "math": math, "math_property": "amount"} for math in ("sum", "avg")]
    return [s["data"] for s in api.post("trend/", {**RANGE, "events": series})["result"]]


def _busiest(events: list[dict[str, Any]], person: dict[str, str]) -> list[list[float]]:
    """Per day: the median purchase amount (0 without any) and the most $pageviews of one person."""
    amounts: list[list[float]] = [[] for _ in range(DAYS)]
    views: list[Counter[str]] = [Counter() for _ in range(DAYS)]
    for e in events:
        amount = e["properties"].get("amount")
        if e["event"] == "purchase" and amount is not None and amount != "n/a":
            amounts[_day(e)].append(float(amount))
        if e["event"] == "$pageview":
            views[_day(e)][person[e["distinct_id"]]] += 1
    return [[float(statistics.median(a)) if a else 0 for a in amounts],
            [max(v.values(), default=0) for v in views]]


def _ask_busiest(api: Api) -> list[list[float]]:
    series = [{"id": "purchase", "math": "median", "math_property": "amount"},
              {"id": "$pageview", "math": "max_count_per_actor"}]
    return [s["data"] for s in api.post("trend/", {**RANGE, "events": series})["result"]]


def _pro_trend(events: list[dict[str, Any]], person: dict[str, str], people: dict[str, dict[str, Any]]
               ) -> list[list[int]]:
    """$pageview events of persons whose `plan` is now "pro": total and distinct persons per day."""
    totals, persons = [0] * DAYS, [set() for _ in range(DAYS)]
    for e in events:
        if e["event"] == "$pageview" and people.get(e["distinct_id"], {}).get("plan") == "pro":
            totals[_day(e)] += 1
            persons[_day(e)].add(person[e["distinct_id"]])
    return [totals, [len(p) for p in persons]]


def _ask_pro(api: Api) -> list[list[int]]:
    series = [{"id": "$pageview", "math": math,
               "properties": [{"key": "plan", "value": ["pro"], "operator": "exact", "type": "person"}]}
              for math in ("total", "dau")]
    return [s["data"] for s in api.post("trend/", {**RANGE, "events": series})["result"]]


def _ask_filtered(api: Api, browser: str) -> list[list[int]]:
    series = [{"id": "$pageview", "math": math,
               "properties": [{"key": "$browser", "value": [browser], "operator": "exact", "type": "event"}]}
              for math in ("total", "dau")]
    return [s["data"] for s in api.post("trend/", {**RANGE, "events": series})["result"]]


def _ask_funnel(api: Api, query: dict[str, Any]) -> list[int]:
    return [s["count"] for s in api.post("funnel/", query)["result"]]


def _ask_paths(api: Api, query: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(e["source"], e["target"]): e["value"] for e in api.post("path/", query)["result"]}


def _archived_uuids(data_dir: Path, project_id: int) -> list[str]:
    return sorted(Archive(data_dir / "archive").events(project_id).column("uuid").to_pylist())


TWO_STEPS = {**RANGE, "events": [{"id": "$pageview", "order": 0}, {"id": "purchase", "order": 1}],
             "funnel_window_days": 7}
FOUR_STEP_PATHS = {**PATHS, "step_limit": 4}


def test_new_definitions_after_restarts_are_built_from_the_archive(tmp_path: Path) -> None:
    """Capture, stop, start again on the same data dir (the embedded broker comes back empty), then ask
    for a filtered trend, an ordered funnel and paths never asked before, over the days before the
    restart. Then capture more while the dataflow is killed (-9) in the middle of its archive
    writes, restart the whole stack again, and ask new definitions over all of it, built in steps of
    a few events."""
    rng = random.Random(15)
    first = _priced(stream(rng, personas=30), rng)
    second = _priced(_renamed(stream(rng, personas=30), "z"), rng)
    data_dir = tmp_path / "data"
    up = Up.start(data_dir, env=CLOCK)
    try:
        token, _ = _project(up, 41)
        _capture(up, token, rng.sample(first, len(first)))
        up.wait_applied(60)
        assert up.stop() == 0, up.seen
    finally:
        up.kill()

    up = Up.start(data_dir, env=CLOCK)
    try:
        assert any(line.startswith("the events topic is new") and f"{len(first)} events" in line
                   for line in up.output()), up.seen
        _, api = _project(up, 41)
        person = final_persons(first)
        expected = oracle(first, person)
        assert _ask_filtered(api, "Chrome") == _filtered_trend(first, person, "Chrome")
        assert _ask_funnel(api, ORDERED) == expected["funnel"]
        assert _ask_paths(api, PATHS) == expected["paths"]
        assert up.readyz()["topic_recreated"]["previous_topic_id"]

        # More history, with the dataflow killed while it applies and archives it.
        sender = threading.Thread(target=_capture, args=(up, token, rng.sample(second, len(second)), 20, 0.02))
        sender.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Archive(data_dir / "archive").totals()[1] <= len(first):
            time.sleep(0.01)
        os.kill(up.pids()["dataflow"], signal.SIGKILL)
        sender.join(120)
        up.wait_for("restarted dataflow", 60)
        up.wait_applied(120)
        assert up.stop() == 0, up.seen
    finally:
        up.kill()

    everything = first + second
    assert _archived_uuids(data_dir, 41) == sorted(e["uuid"] for e in everything)  # each event once
    # Steps of five archived events: each build takes many, each written while the next is evaluated.
    log = data_dir / "logs" / "dataflow.log"
    logged = log.stat().st_size
    up = Up.start(data_dir, env={**CLOCK, "INSIGHTFLOW_BACKFILL_CHUNK": "5"})
    try:
        _, api = _project(up, 41)
        person = final_persons(everything)
        expected = oracle(everything, person)
        assert _ask_filtered(api, "Safari") == _filtered_trend(everything, person, "Safari")
        for got, expected_amounts in zip(_ask_amounts(api), _amounts(everything), strict=True):  # property maths
            assert got == pytest.approx(expected_amounts)
        for got, expected_values in zip(_ask_busiest(api), _busiest(everything, person), strict=True):  # quantiles,
            assert got == pytest.approx(expected_values)  # and counts per actor
        # Person properties as they are now (as the backfill reads them), by distinct_id.
        people = person_snapshot(up.redis, 41, {e["distinct_id"] for e in everything})
        assert sum(p.get("plan") == "pro" for p in people.values()) > 3
        assert _ask_pro(api) == _pro_trend(everything, person, people)
        pro_first = {**TWO_STEPS, "events": [
            {"id": "$pageview", "order": 0,
             "properties": [{"key": "plan", "value": ["pro"], "operator": "exact", "type": "person"}]},
            {"id": "purchase", "order": 1}]}
        assert _ask_funnel(api, pro_first) == _two_step_funnel(
            everything, person, first=lambda e: people.get(e["distinct_id"], {}).get("plan") == "pro")
        assert _ask_funnel(api, TWO_STEPS) == _two_step_funnel(everything, person)
        for order in ("unordered", "strict"):  # funnels that keep their events per day, not per person
            assert _ask_funnel(api, {**TWO_STEPS, "funnel_order_type": order}) == _two_step_funnel(
                everything, person, order), order
        assert _ask_paths(api, FOUR_STEP_PATHS) == default_paths(everything, lambda e: person[e["distinct_id"]], 4)
        # The definitions of the first restart were kept live through the second batch.
        assert _ask_filtered(api, "Chrome") == _filtered_trend(everything, person, "Chrome")
        assert _ask_funnel(api, ORDERED) == expected["funnel"]
        assert _ask_paths(api, PATHS) == expected["paths"]
        steps = log.read_bytes()[logged:].count(b"evaluated by columns")
        assert steps > 4 * 8, steps  # 4 definitions by columns (strict funnels go event by event), 8 partitions
    finally:
        up.kill()


def test_a_topic_deleted_and_recreated_leaves_history_to_the_archive(tmp_path: Path) -> None:
    """The topic is deleted by hand and created again while the stack runs: its early events are gone
    from the broker, yet a definition registered afterwards counts them, from the archive."""
    rng = random.Random(16)
    early, late = stream(rng, personas=20), _renamed(stream(rng, personas=10), "late-")
    data_dir = tmp_path / "data"
    up = Up.start(data_dir, env=CLOCK)
    try:
        token, api = _project(up, 42)
        _capture(up, token, early)
        up.wait_applied(60)
        bootstrap = json.loads((data_dir / "stack.json").read_text())["INSIGHTFLOW_KAFKA_BOOTSTRAP"]
        admin = AdminClient({"bootstrap.servers": bootstrap})
        before = topic_id(bootstrap, "events")
        for future in admin.delete_topics(["events"]).values():
            future.result()
        time.sleep(1)
        ensure_topics(bootstrap, ["events"], 8)  # unless a client's metadata request made it already
        assert topic_id(bootstrap, "events") != before
        os.kill(up.pids()["dataflow"], signal.SIGKILL)  # its consumers held the old topic
        up.wait_for("restarted dataflow", 60)
        _capture(up, token, late)  # maybe before the dataflow noticed the new topic: lag still counts them
        up.wait_applied(60)
        everything = early + late
        person = final_persons(everything)
        assert _ask_filtered(api, "Firefox") == _filtered_trend(everything, person, "Firefox")
        assert _ask_funnel(api, ORDERED) == oracle(everything, person)["funnel"]
        assert up.readyz()["topic_recreated"]["previous_topic_id"] == before
        assert [e for e in everything if e["event"] in LINKS]  # the persons' links were in the lost part too
    finally:
        up.kill()
