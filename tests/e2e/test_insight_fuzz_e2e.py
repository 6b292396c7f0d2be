"""Mutated insight requests against every endpoint: none answers 5xx (hypothesis, seeded, in the suite).

Valid bodies of each endpoint (`tests/insight_fuzz.py`) get one to three fields replaced by huge,
negative and zero numbers, extreme and malformed dates, wrong types, deep nesting or long strings.
It runs against a stack of its own (`insightflow up`), so the definitions the mutated requests
register are built from its small topic without loading the shared stack. At least 10,000 requests
per run, 25 at a time.
"""

from __future__ import annotations

import copy
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from state.registry import Registry
from tests.insight_fuzz import DATES, NUMBERS, TYPES, VALID, _places, deep
from tests.upstack import Up

pytestmark = pytest.mark.e2e

BATCH = 25
EXAMPLES = 400  # × BATCH = 10,000 requests
VALUES = st.one_of(
    st.sampled_from(NUMBERS), st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(DATES), st.sampled_from(TYPES),
    st.text(max_size=12), st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2), st.builds(deep, st.sampled_from([40, 900])),
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    endpoint = draw(st.sampled_from(sorted(VALID)))
    body = copy.deepcopy(VALID[endpoint])
    for _ in range(draw(st.integers(1, 3))):
        places = _places(body)
        container, key = places[draw(st.integers(0, len(places) - 1))]
        container[key] = draw(VALUES)
    return endpoint, draw(st.sampled_from(["GET", "POST"])), body


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # deeper than orjson writes: the stdlib does
        return json.dumps(value)


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    up = Up.start(tmp_path_factory.mktemp("insight-fuzz") / "data",
                  env={"INSIGHTFLOW_BLOCKING_TIMEOUT": "2", "INSIGHTFLOW_RATE_LIMIT": "1000000"})
    try:
        registry = Registry(up.redis)
        registry.save_project(1, token="phc_fuzz")
        key, _ = registry.create_key([1], ["insight:read"])
        events = [{"event": name, "distinct_id": f"u{i % 40}", "timestamp": f"2026-11-{1 + i % 26:02d}T10:00:00Z",
                   "properties": {"$browser": ["Chrome", "Safari"][i % 2], "$current_url":
                                  f"https://shop.example/{['', 'docs/1', 'pricing'][i % 3]}"}}
                   for i, name in enumerate(["$pageview", "signed up", "purchase", "$pageview"] * 100)]
        reply = httpx.post(f"{up.url}/batch/", json={"api_key": "phc_fuzz", "batch": events}, timeout=30)
        assert reply.status_code == 200
        up.wait_applied()
        yield up, key
    finally:
        up.kill()


def test_mutated_insight_requests_never_answer_5xx(fuzz_stack: Any) -> None:
    up, key = fuzz_stack
    base = f"{up.url}/api/environments/1/insights/"
    headers = {"Authorization": f"Bearer {key}", "X-Insightflow-Now": "2026-11-27T12:00:00Z"}
    statuses: Counter[int] = Counter()
    failures: list[tuple[int, str, str, str]] = []
    clients = [httpx.Client(timeout=120, headers=headers) for _ in range(BATCH)]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))  # the stdlib encoder for 900-deep values

    def send(index: int, request: tuple[str, str, dict[str, Any]]) -> None:
        endpoint, method, body = request
        client = clients[index]
        if method == "GET":
            reply = client.get(f"{base}{endpoint}/", params={k: v if isinstance(v, str) else _json(v)
                                                            for k, v in body.items()})
        else:
            reply = client.post(f"{base}{endpoint}/", content=_json(body).encode(),
                                headers={"Content-Type": "application/json"})
        statuses[reply.status_code] += 1
        if reply.status_code >= 500:
            failures.append((reply.status_code, endpoint, method, _json(body)[:300]))

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutated(), min_size=BATCH, max_size=BATCH))
    def batch(requests: list[tuple[str, str, dict[str, Any]]]) -> None:
        with ThreadPoolExecutor(BATCH) as pool:
            list(pool.map(send, range(len(requests)), requests))

    batch()
    for client in clients:
        client.close()
    assert sum(statuses.values()) >= EXAMPLES * BATCH
    print("insight fuzz statuses:", dict(statuses))
    assert not failures, (statuses, failures[:10])
    assert statuses[400] > 1000 and statuses[200] > 500, statuses  # both sides of validation were reached
