"""A seeded capture fuzz through the whole stack: no 5xx, and every event applied exactly once or
refused by index and never applied.

Requests are valid SDK batches with mutations: extreme and malformed timestamps, offsets and
sent_at, wrong types for every field, duplicated and resent uuids, deep and huge properties,
identity events with odd ids, broken envelopes and bodies, every capture path and encoding. The
project keeps an ordered funnel and a broken-down trend definition, so the definitions' code runs
on every accepted event too. Set INSIGHTFLOW_FUZZ_SEED / INSIGHTFLOW_FUZZ_REQUESTS to explore.
"""

from __future__ import annotations

import base64
import gzip
import os
import random
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from state import keys
from state.store import StateStore
from tests.conftest import ProjectHandle, Stack, make_project

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("INSIGHTFLOW_FUZZ_SEED", "20261127"))
REQUESTS = int(os.environ.get("INSIGHTFLOW_FUZZ_REQUESTS", "5000"))
NAMES = ["fz_view", "fz_buy", "$identify", "$create_alias", "fz_other"]
PATHS = ["/batch/", "/capture/", "/e/", "/i/v0/e/"]

ODD = [None, True, 0, -1, 5, 1e20, -1e20, 1e15, "", " ", "x", "x" * 300, [], [1], {}, {"a": 1}]
ODD_TIMES = [1e20, -1e20, 1e15, 0, -1, 1.7e12, "garbage", "", "0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00",
             "1600-01-01T00:00:00Z", "9999-12-31T23:59:59", "2024-02-30T00:00:00Z", "2024-03-05T25:00:00Z",
             "2199-12-31T23:59:59.999Z", "2200-01-01T00:00:00Z", "1900-01-01T00:00:00Z", [], {}, True]
ODD_OFFSETS = [1e20, -1e20, -1e13, 1e13, 0, 5000, -5000, "x", True, [], 1.5]
ODD_SENT_AT = [1e19, -1e19, "9999-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "nope", {}, [], 0, "2024-03-05T12:00:00Z"]


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"d": value}
    return value


@dataclass
class Sent:
    """One request: its events (as sent), how it went, and which indices the answer refused."""

    events: list[Any]
    status: int = 0
    rejected: set[int] = field(default_factory=set)
    accepted_all: bool = False


class Fuzz:
    def __init__(self, rng: random.Random, token: str) -> None:
        self.rng, self.token = rng, token
        self.sent_uuids: list[dict[str, Any]] = []  # earlier valid events, resent as SDKs do

    def event(self) -> Any:
        rng = self.rng
        if rng.random() < 0.04:
            return rng.choice([5, "x", [], None, [{"event": "x"}]])
        if self.sent_uuids and rng.random() < 0.05:
            return dict(rng.choice(self.sent_uuids))  # a resend: same uuid, same content
        name = rng.choice(NAMES)
        event: dict[str, Any] = {"event": name, "distinct_id": f"d{rng.randrange(40)}", "uuid": str(uuid.uuid4()),
                                 "timestamp": f"2024-03-{rng.randrange(1, 28):02d}T{rng.randrange(24):02d}:00:00Z",
                                 "properties": {"$browser": rng.choice(["Chrome", "Safari", None, "", 7])}}
        if name == "$identify":
            event["properties"]["$anon_distinct_id"] = rng.choice([f"a{rng.randrange(40)}", *ODD])
        if name == "$create_alias":
            event["properties"]["alias"] = rng.choice([f"d{rng.randrange(40)}", *ODD])
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
            self.mutate(event)
        if isinstance(event.get("uuid"), str) and rng.random() < 0.3:
            self.sent_uuids.append(dict(event))
        return event

    def mutate(self, event: dict[str, Any]) -> None:
        rng = self.rng
        kind = rng.randrange(14)
        props = event["properties"] if isinstance(event.get("properties"), dict) else {}
        if kind == 0:
            event["timestamp"] = rng.choice(ODD_TIMES)
        elif kind == 1:
            event["offset"] = rng.choice(ODD_OFFSETS)
        elif kind == 2:
            event["sent_at"] = rng.choice(ODD_SENT_AT)
        elif kind == 3:
            event["event"] = rng.choice(ODD)
        elif kind == 4:
            event["distinct_id"] = rng.choice(ODD)
        elif kind == 5:
            event["uuid"] = rng.choice(["bad", 5, "", None, "0190A8C4BD2F70008000000000000001", []])
        elif kind == 6:
            event["properties"] = rng.choice([[], "s", 5, None, {"$set": "x"}, {"$unset": 5}, {"$set_once": []}])
        elif kind == 7:
            props["$set"] = rng.choice([{"plan": rng.choice(ODD)}, {"": 1}, {"n": 1e308}, {"deep": _deep(20)}])
        elif kind == 8:
            props["nested"] = _deep(rng.choice([50, 240, 300]))
        elif kind == 9:
            props["big"] = "x" * rng.choice([10, 100_000, 1_100_000])
        elif kind == 10:
            props["$ignore_sent_at"] = True
            event["sent_at"] = rng.choice(ODD_SENT_AT)
        elif kind == 11:
            props["v"] = rng.choice([1e308, -1e308, 10**30, "12", None])
        elif kind == 12:
            event["$set"] = rng.choice([{"top": 1}, "x", []])
        else:
            event.pop(rng.choice(["timestamp", "uuid", "properties", "event", "distinct_id"]), None)
        if props is not event.get("properties") and isinstance(event.get("properties"), dict):
            event["properties"].update(props)

    def request(self) -> tuple[str, dict[str, str], bytes, Sent]:
        rng = self.rng
        events = [self.event() for _ in range(rng.choice([1, 1, 2, 3, 5, 8]))]
        sent = Sent(events)
        envelope: dict[str, Any] = {"api_key": self.token, "batch": events}
        if rng.random() < 0.1:
            envelope["sent_at"] = rng.choice(ODD_SENT_AT)
        roll = rng.random()
        if roll < 0.02:
            envelope["api_key"] = rng.choice(["phc_wrong", "", 5])
        elif roll < 0.04:
            envelope["batch"] = rng.choice([{"event": "x"}, "x", 5])
        path = rng.choice(PATHS)
        try:
            body = orjson.dumps(envelope)
        except orjson.JSONEncodeError:  # nested too deep for us to even send as JSON: send it broken
            body = b'{"api_key": "' + self.token.encode() + b'", "batch": [' + b"[" * 300
        headers = {"Content-Type": "application/json"}
        encoding = rng.random()
        if encoding < 0.1:
            body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
        elif encoding < 0.15:
            body = b"data=" + base64.b64encode(body).replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
        elif encoding < 0.18:
            body = rng.choice([b"{", b"\x1f\x8bnot gzip", b"", b"null", b"[]", body[: len(body) // 2]])
        return path, headers, body, sent


def _name(raw: Any) -> str:
    value = raw["event"]
    return value if isinstance(value, str) else str(value)


def _uuid(raw: Any) -> str | None:
    """The uuid capture keeps for an event (canonical form), None when it assigns one."""
    value = raw.get("uuid") if isinstance(raw, dict) else None
    if not isinstance(value, str) or not value:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _seen(running: Stack, project_id: int, event_uuids: list[str]) -> list[bool]:
    return [copy is not None for copy in StateStore(running.redis).counted_from(project_id, event_uuids)]


def test_capture_fuzz(running: Stack) -> None:
    project: ProjectHandle = make_project(running, timezone="Pacific/Kiritimati")  # UTC+14: the widest zone
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": "2024-04-01T00:00:00Z"}
    base = f"{running.api_url}/api/environments/{project.id}/insights"
    for path, query in (("funnel", {"events": [{"id": "fz_view", "order": 0}, {"id": "fz_buy", "order": 1}]}),
                        ("trend", {"events": [{"id": "fz_view"}], "breakdown": "$browser"})):
        reply = httpx.post(f"{base}/{path}/", json={**query, "refresh": "blocking", "date_from": "2024-03-01"},
                           headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
    dlq_before = running.readyz()["dlq_events"]

    fuzz = Fuzz(random.Random(SEED), project.token)
    requests = [fuzz.request() for _ in range(REQUESTS)]
    statuses: Counter[int] = Counter()

    def send(item: tuple[str, dict[str, str], bytes, Sent], client: httpx.Client) -> None:
        path, headers, body, sent = item
        reply = client.post(f"{running.api_url}{path}", content=body, headers=headers)
        sent.status = reply.status_code
        statuses[reply.status_code] += 1
        if reply.status_code == 200:
            sent.accepted_all = True
        elif reply.status_code == 400 and "rejected" in reply.json():
            sent.rejected = {r["index"] for r in reply.json()["rejected"]}
            assert reply.json()["accepted"] == len(sent.events) - len(sent.rejected)

    clients = [httpx.Client(timeout=60) for _ in range(16)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda pair: send(pair[1], clients[pair[0] % 16]), enumerate(requests)))
    for client in clients:
        client.close()
    assert not [s for s in statuses if s >= 500], statuses
    assert statuses[200] > REQUESTS * 0.3 and statuses[400] > REQUESTS * 0.1, statuses  # the fuzz hits both sides

    expected: Counter[str] = Counter()
    applied_uuids: dict[str, str] = {}
    refused_uuids: set[str] = set()
    for _, _, _, sent in requests:
        for index, raw in enumerate(sent.events):
            accepted = sent.accepted_all or (bool(sent.rejected) and index not in sent.rejected)
            given = _uuid(raw)
            if accepted:
                if given is None:  # capture assigns a fresh one
                    expected[_name(raw)] += 1
                elif given not in applied_uuids:  # resent copies count once
                    applied_uuids[given] = _name(raw)
                    expected[_name(raw)] += 1
            elif given is not None:
                refused_uuids.add(given)
    refused_uuids -= set(applied_uuids)  # a resend of an accepted event may itself be refused (its batch broke)
    running.wait_applied(timeout=120)

    counted = {name: sum(int(v) for v in running.redis.hgetall(keys.day_counts(project.id, name)).values())
               for name in expected}
    assert counted == dict(expected)
    assert all(_seen(running, project.id, list(applied_uuids))), "an accepted event was not applied"
    assert not any(_seen(running, project.id, sorted(refused_uuids))), "a refused event was applied"
    assert running.readyz()["dlq_events"] == dlq_before  # capture let nothing through the dataflow cannot use
    for path in ("funnel", "trend"):
        reply = httpx.post(f"{base}/{path}/", json={"events": [{"id": "fz_view", "order": 0},
                                                               {"id": "fz_buy", "order": 1}],
                                                    "date_from": "2024-03-01", "date_to": "2024-03-31"},
                           headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
