"""Bytewax cluster mode: two dataflow processes keep the same state as one, a kill -9 of one included.

Each stack is a real `insightflow up` (Redis, Tansu, dataflow processes, API) on its own data dir; the
same events and questions go to a 2-process stack (one process killed half-way) and a 1-process stack.
"""

from __future__ import annotations

import os
import random
import signal
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from state import keys
from state.registry import Registry
from tests.upstack import Up

pytestmark = pytest.mark.e2e

PROJECT = 41
NOW = "2024-04-12T00:00:00Z"
FUNNEL = {"insight": "FUNNELS", "events": [{"id": "$pageview", "order": 0}, {"id": "signup", "order": 1},
                                           {"id": "purchase", "order": 2}],
          "funnel_window_days": 3, "date_from": "2024-04-01", "date_to": "2024-04-11",
          "breakdown_type": "event", "breakdown": "$browser"}
FILTERED = {"events": [{"id": "$pageview", "math": "dau"}], "date_from": "2024-04-01", "date_to": "2024-04-11",
            "properties": [{"key": "$browser", "value": ["Chrome"], "operator": "exact", "type": "event"}]}
# Asked only after every event: new definitions built by the cluster's backfill.
LATER = [
    ("trend/", {"events": [{"id": "$pageview"}, {"id": "$pageview", "math": "dau"},
                           {"id": "signup", "math": "weekly_active"}],
                "date_from": "2024-04-01", "date_to": "2024-04-11"}),
    ("trend/", {"events": [{"id": "$pageview"}], "breakdown": "$browser", "date_from": "2024-04-01",
                "date_to": "2024-04-11"}),
    ("trend/", {"events": [{"id": "purchase", "math": "sum", "math_property": "amount"}],
                "date_from": "2024-04-01", "date_to": "2024-04-11"}),
    ("trend/", {"events": [{"id": "signup", "math": "first_time_for_user"}], "date_from": "2024-04-01",
                "date_to": "2024-04-11"}),
    ("retention/", {"period": "Day", "total_intervals": 7, "date_to": "2024-04-08",
                    "target_entity": {"id": "$pageview", "type": "events"},
                    "returning_entity": {"id": "purchase", "type": "events"}}),
    ("path/", {"include_event_types": ["custom_event", "$pageview"], "date_from": "2024-04-01",
               "date_to": "2024-04-11", "step_limit": 4}),
    ("funnel/", {**FUNNEL, "breakdown_attribution_type": "last_touch", "funnel_window_days": 1}),
]


def _events() -> list[dict[str, Any]]:
    """Persons of one distinct id each (merges are another issue's), over ten days."""
    rng = random.Random(13)
    out = []
    for n in range(12_000):
        who = f"u{rng.randrange(300)}"
        name = rng.choices(["$pageview", "signup", "purchase", "other"], [6, 2, 1, 1])[0]
        props: dict[str, Any] = {"$browser": rng.choice(["Chrome", "Firefox", "Safari"])}
        if name == "purchase":
            props["amount"] = rng.randrange(1, 100)
        if n % 17 == 0:
            props["$set"] = {"plan": rng.choice(["free", "pro"])}
        out.append({"event": name, "distinct_id": who, "uuid": str(uuid.UUID(int=rng.getrandbits(128))),
                    "properties": props, "timestamp": f"2024-04-{1 + rng.randrange(10):02d}T"
                                                      f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"})
    return out


def _plain(value: Any) -> Any:
    """An answer without what differs between two stacks: URLs (their hosts), refresh times."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()
                if not k.endswith("url") and k not in {"last_refresh", "next", "is_cached"}}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class StackClient:
    """One project's capture and insight requests against one stack (its API and its Redis)."""

    def __init__(self, url: str, client: Any, token: str, project_id: int = PROJECT) -> None:
        registry = Registry(client)
        self.url, self.redis, self.token, self.project_id = url, client, token, project_id
        registry.save_project(project_id, token=token)
        self.key, _ = registry.create_key([project_id], ["insight:read"])

    def capture(self, events: list[dict[str, Any]]) -> None:
        for i in range(0, len(events), 500):
            reply = httpx.post(f"{self.url}/batch/", json={"api_key": self.token, "batch": events[i:i + 500]},
                               timeout=30)
            assert reply.status_code == 200, reply.text

    def ask(self, path: str, body: dict[str, Any]) -> Any:
        reply = httpx.post(f"{self.url}/api/environments/{self.project_id}/insights/{path}",
                           json={**body, "refresh": "blocking"}, timeout=300,
                           headers={"Authorization": f"Bearer {self.key}", "X-Insightflow-Now": NOW})
        assert reply.status_code == 200, reply.text
        return _plain(reply.json())

    def state(self) -> dict[str, Any]:
        """State that does not depend on which person ids were handed out: counts as stored, and
        persons as their sets of distinct ids with their properties."""
        client = self.redis
        names = sorted(n.decode() for n in client.smembers(keys.event_names(PROJECT)))
        by_person: dict[bytes, set[str]] = defaultdict(set)
        for did, person in client.hgetall(keys.distinct_ids(PROJECT)).items():
            by_person[person].add(did.decode())
        persons = {frozenset(dids): client.hgetall(keys.person_properties(PROJECT, int(p)))
                   for p, dids in by_person.items()}
        return {"names": names, "persons": persons,
                "day": {n: client.hgetall(keys.day_counts(PROJECT, n)) for n in names},
                "hour": {n: client.hgetall(keys.hour_counts(PROJECT, n)) for n in names}}


def _run(data_dir: Path, processes: int, events: list[dict[str, Any]]) -> tuple[list[Any], dict[str, Any], Up]:
    up = Up.start(data_dir, env={"INSIGHTFLOW_DATAFLOW_PROCESSES": str(processes), "INSIGHTFLOW_TEST_CLOCK": "1",
                                 "INSIGHTFLOW_PARTITIONS": "4"})
    try:
        client = StackClient(up.url, up.redis, f"phc_cluster_{PROJECT}")
        early = [client.ask("funnel/", FUNNEL), client.ask("trend/", FILTERED)]  # kept live from here on
        half = len(events) // 2
        client.capture(events[:half])
        if processes > 1:  # mid-stream: the cluster is still applying what was just captured
            killed = up.pids()["dataflow-1"]
            os.kill(killed, signal.SIGKILL)
            up.wait_for("restarted dataflow", 60)
            assert up.pids()["dataflow-1"] != killed
        client.capture(events[half:])
        up.wait_applied(180)
        answers = [*early, client.ask("funnel/", FUNNEL), client.ask("trend/", FILTERED)]
        answers += [client.ask(path, body) for path, body in LATER]
        return answers, client.state(), up
    except BaseException:
        up.kill()
        raise


def test_two_processes_keep_the_state_of_one_after_a_kill(tmp_path: Path) -> None:
    events = _events()
    two, two_state, up = _run(tmp_path / "two", 2, events)
    try:
        out = up.output()
        assert any(line.startswith("dataflow-1 exited with code -9") for line in out), out
        # Its peer fails with it (Bytewax), or `up` stops it: the cluster restarts as one.
        assert any(line.startswith(("dataflow exited", "stopping dataflow ")) for line in out), out
        assert any(line.startswith("restarted dataflow; pid ") and "dataflow-1 pid" in line for line in out), out
    finally:
        up.stop()
        up.kill()
    one, one_state, up = _run(tmp_path / "one", 1, events)
    up.stop()
    up.kill()
    assert two_state == one_state
    assert sum(int(v) for day in one_state["day"].values() for v in day.values()) == len(events)
    assert len(one_state["persons"]) == 300
    for index, (a, b) in enumerate(zip(two, one, strict=True)):
        assert a == b, f"answer {index} differs"
    funnel = one[2]["result"]
    assert sum(b[0]["count"] for b in funnel) > sum(b[2]["count"] for b in funnel) > 0  # a real funnel
