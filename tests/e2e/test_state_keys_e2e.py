"""Every key written to Redis is declared in state/keys.py.

Redis reports each write (keyspace notifications) while a workload touches every kind of state:
capture with person links and properties, every insight kind (registering definitions of each
storage kind, backfilled and then live), saved insights with views and access entries, dead letters.
Every key written, and every key left in Redis by the whole session so far, must be declared.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from confluent_kafka import Producer

from state import keys
from state.connection import is_cluster
from state.registry import Registry
from tests.conftest import Stack, make_project

NOW = "2024-05-20T00:00:00Z"
BASE = datetime(2024, 5, 1, 9, tzinfo=UTC)


def _events(offset: int) -> list[dict]:
    out: list[dict] = []
    for i in range(30):
        who = f"k{i % 6}"
        moment = (BASE + timedelta(days=i % 10, hours=i + offset)).isoformat()
        out.append({"event": ["view", "signup", "pay"][i % 3], "distinct_id": who, "uuid": str(uuid.uuid4()),
                    "timestamp": moment, "properties": {"$browser": ["Chrome", "Safari"][i % 2], "amount": i,
                                                        "$set": {"plan": "pro"}, "$set_once": {"first": i},
                                                        "$current_url": f"/p{i % 4}"}})
    moment = (BASE + timedelta(days=3)).isoformat()
    out += [{"event": "$identify", "distinct_id": "k0", "uuid": str(uuid.uuid4()), "timestamp": moment,
             "properties": {"$anon_distinct_id": f"anon{offset}", "$unset": ["first"]}},
            {"event": "$create_alias", "distinct_id": "k1", "uuid": str(uuid.uuid4()), "timestamp": moment,
             "properties": {"alias": f"alias{offset}"}},
            {"event": "view", "distinct_id": f"twin{offset}", "uuid": str(uuid.uuid4()), "timestamp": moment},
            {"event": "signup", "distinct_id": f"twin{offset}", "uuid": str(uuid.uuid4()), "timestamp": moment},
            {"event": "$pageview", "distinct_id": "k4", "uuid": str(uuid.uuid4()), "timestamp": moment,
             "properties": {"$current_url": "/home"}}]
    if offset:  # both persons exist by now: merged
        out.append({"event": "$merge_dangerously", "distinct_id": "k2", "uuid": str(uuid.uuid4()),
                    "timestamp": moment, "properties": {"alias": "k3"}})
    return out


QUERIES: list[tuple[str, dict]] = [
    ("trend", {"events": [{"id": "view", "math": "dau"}], "interval": "hour"}),
    ("trend", {"events": [{"id": "pay", "math": "sum", "math_property": "amount"}], "breakdown": "$browser"}),
    ("trend", {"events": [{"id": "pay", "math": "p90", "math_property": "amount"}]}),
    ("trend", {"events": [{"id": "view", "math": "avg_count_per_actor"}]}),
    ("trend", {"events": [{"id": "view", "math": "first_time_for_user"}]}),
    ("trend", {"events": [{"id": "view", "properties": [{"key": "$browser", "value": "Chrome"}]}]}),
    ("trend", {"events": [{"id": "signup"}], "breakdown": "plan", "breakdown_type": "person"}),
    ("funnel", {"events": [{"id": "view", "order": 0}, {"id": "signup", "order": 1}, {"id": "pay", "order": 2}]}),
    ("funnel", {"events": [{"id": "view", "order": 0}, {"id": "pay", "order": 1}], "funnel_order_type": "unordered"}),
    ("funnel", {"events": [{"id": "view", "order": 0}, {"id": "pay", "order": 1}], "breakdown": "$browser",
                "breakdown_type": "event"}),
    ("path", {"include_event_types": ["custom_event", "$pageview"]}),
    ("retention", {"target_entity": {"id": "view", "type": "events"},
                   "returning_entity": {"id": "pay", "type": "events"}, "total_intervals": 5}),
]


def _written(pubsubs: list[Any], until: float) -> set[str]:
    found: set[str] = set()
    for pubsub in pubsubs:
        while time.monotonic() < until:
            message = pubsub.get_message(timeout=0.2)
            if message is None:
                break
            if message["type"] == "pmessage":
                found.add(message["channel"].decode(errors="replace").split(":", 1)[1])
    return found


def test_every_key_written_is_declared(running: Stack) -> None:
    client = running.redis
    # Every server's keyspace events (each master of a cluster publishes its own keys').
    servers = [client.get_redis_connection(n) for n in client.get_primaries()] if is_cluster(client) else [client]
    previous = servers[0].config_get("notify-keyspace-events")["notify-keyspace-events"]
    pubsubs = []
    for server in servers:
        server.config_set("notify-keyspace-events", "KA")
        pubsubs.append(server.pubsub())
        pubsubs[-1].psubscribe("__keyspace@*__:*")
    written: set[str] = set()
    try:
        project = make_project(running)
        registry = Registry(client)
        writer, _ = registry.create_key([project.id], ["*"])
        headers = {"Authorization": f"Bearer {writer}", "X-Insightflow-Now": NOW}
        api = f"{running.api_url}/api/environments/{project.id}/insights"
        assert project.capture(_events(0)).status_code == 200
        running.wait_applied()
        for kind, query in QUERIES:  # registered and backfilled over the events so far
            body = {"date_from": "2024-05-01", "date_to": "2024-05-15", **query, "refresh": "blocking"}
            reply = httpx.post(f"{api}/{kind}/", json=body, headers=headers, timeout=60)
            assert reply.status_code == 200, (kind, query, reply.text)
        assert project.capture(_events(1)).status_code == 200  # then applied live
        producer = Producer({"bootstrap.servers": running.services.bootstrap})
        producer.produce("events", value=b"not json at all")  # dead-lettered
        producer.flush(10)
        insight = httpx.post(f"{api}/", json={"name": "keys", "filters": {"insight": "TRENDS",
                                                                          "events": [{"id": "view"}]}},
                             headers=headers, timeout=60).json()
        assert httpx.post(f"{api}/{insight['id']}/viewed/", headers=headers, timeout=60).status_code == 201
        assert httpx.put(f"{api}/{insight['id']}/access_controls/", json={"access_level": "viewer"},
                         headers=headers, timeout=60).status_code == 200
        running.wait_applied()
        deadline = time.monotonic() + 30
        while any(client.scard(keys.summary_dirty(keys.definition_prefix(project.id, h.decode())))
                  for h in client.hkeys(keys.definitions(project.id))) and time.monotonic() < deadline:
            time.sleep(0.1)
        written = _written(pubsubs, time.monotonic() + 30)
    finally:
        for pubsub, server in zip(pubsubs, servers, strict=True):
            pubsub.close()
            server.config_set("notify-keyspace-events", previous)

    left = {k.decode(errors="replace") for k in client.scan_iter(count=10_000)}
    undeclared = sorted(k for k in written | left if not keys.declared(k))
    assert undeclared == [], undeclared
    # The workload reached each kind of state, so the check above covered them.
    mine = {k[len(keys.project_prefix(project.id)):] for k in written if k.startswith(keys.project_prefix(project.id))}
    project_parts = {name for name, part in keys.PROJECT_PARTS.items()
                     if any(k == part or (part.endswith(":") and k.startswith(part)) for k in mine)}
    # A failure reason is written when Redis refuses a definition's state (test_poison_e2e); the scratch
    # key only while a backfill from the archive ORs in a dense person set (test_state_scripts.py); the
    # uuid guards' hashes were written before the guard log, and are only read now (test_state_scripts.py).
    assert set(keys.PROJECT_PARTS) - project_parts <= {"failed_definitions", "scratch", "seen"}, project_parts
    assert "failed_definitions" not in project_parts and "seen" not in project_parts and "guard_log" in project_parts
    in_definitions = {k.split(":", 2)[2] for k in mine if k.startswith(keys.PROJECT_PARTS["definition"])}
    definition_parts = {name for name, part in keys.DEFINITION_PARTS.items()
                        if any(k == part or (part.endswith(":") and k.startswith(part)) for k in in_definitions)}
    # A backfill's progress is written only when a partition's archived history takes several calls of
    # a few MB (test_state_scripts.py covers it); strings of kept events per definition only by older
    # versions (read beside the kept log; test_poison_e2e.py makes one).
    assert set(keys.DEFINITION_PARTS) - definition_parts == {"backfill_progress", "person_events"}, definition_parts
    assert "kept_log" in project_parts
    assert keys.stream("events") in written and keys.dlq_seen("events") in written
