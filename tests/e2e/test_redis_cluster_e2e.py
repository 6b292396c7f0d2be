"""Redis Cluster: a dataflow and API on a 3-master cluster, each project's state spread over three
state shards, answer exactly what they answer on one Redis with one shard.

The cluster stack (its own masters, topic and dead-letter topic on the session's broker) and the
session's single-Redis stack are given the same events through capture and asked the same questions:
definitions kept live while the events arrive, and definitions built afterwards by backfill.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving import stack
from state import keys
from state.connection import connect, is_cluster
from state.registry import Registry
from state.topics import ensure_topics
from tests.conftest import Services, Stack
from tests.e2e.test_cluster_e2e import FILTERED, FUNNEL, LATER, NOW, _events, _plain
from tests.upstack import wait_lag_zero

pytestmark = pytest.mark.e2e

PROJECT = 43


@dataclass
class _Target:
    url: str
    redis_url: str

    def setup(self) -> None:
        registry = Registry(connect(self.redis_url))
        self.token = f"phc_rc_{PROJECT}"
        registry.save_project(PROJECT, token=self.token)
        self.key, _ = registry.create_key([PROJECT], ["insight:read"])

    def capture(self, events: list[dict[str, Any]]) -> None:
        for i in range(0, len(events), 500):
            reply = httpx.post(f"{self.url}/batch/", json={"api_key": self.token, "batch": events[i:i + 500]},
                               timeout=30)
            assert reply.status_code == 200, reply.text

    def ask(self, path: str, body: dict[str, Any]) -> Any:
        reply = httpx.post(f"{self.url}/api/environments/{PROJECT}/insights/{path}",
                           json={**body, "refresh": "blocking"}, timeout=300,
                           headers={"Authorization": f"Bearer {self.key}", "X-Insightflow-Now": NOW})
        assert reply.status_code == 200, reply.text
        return _plain(reply.json())

    def wait_applied(self) -> None:
        wait_lag_zero(lambda: httpx.get(f"{self.url}/readyz", timeout=5).json(), 180, lambda: "", lambda: None)


@pytest.fixture(scope="module")
def cluster_stack(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Target]:
    workdir: Path = tmp_path_factory.mktemp("redis-cluster")
    nodes, url = stack.start_redis_cluster(workdir / "redis", workdir / "logs")
    env = {"INSIGHTFLOW_REDIS_URL": url, "INSIGHTFLOW_KAFKA_BOOTSTRAP": services.bootstrap,
           "INSIGHTFLOW_TOPIC": "events_rc", "INSIGHTFLOW_TEST_CLOCK": "1", "INSIGHTFLOW_PARTITIONS": "4",
           "INSIGHTFLOW_STATE_SHARDS": "3"}
    ensure_topics(services.bootstrap, ["events_rc", "events_rc_dlq"], 4)
    dataflow = stack.start_dataflow(workdir / "recovery", workdir / "logs", env)
    port = stack.free_port()
    api = stack.start_api(port, workdir / "logs", env)
    try:
        yield _Target(f"http://127.0.0.1:{port}", url)
    finally:
        api.stop()
        dataflow.stop()
        for node in nodes:
            node.stop()


def test_a_cluster_answers_what_one_redis_answers(cluster_stack: _Target, running: Stack) -> None:
    assert is_cluster(connect(cluster_stack.redis_url))
    single = _Target(running.api_url, running.services.redis_url)
    targets = [cluster_stack, single]
    events = _events()
    answers: list[list[Any]] = [[], []]
    for target, found in zip(targets, answers, strict=True):
        target.setup()
        found += [target.ask("funnel/", FUNNEL), target.ask("trend/", FILTERED)]  # kept live from here
        target.capture(events)
    for target, found in zip(targets, answers, strict=True):
        target.wait_applied()
        found += [target.ask("funnel/", FUNNEL), target.ask("trend/", FILTERED)]
        found += [target.ask(path, body) for path, body in LATER]
    cluster = connect(cluster_stack.redis_url)
    spread = keys.in_shards(keys.day_counts(PROJECT, "$pageview"), 3)
    assert all(cluster.exists(key) for key in spread)  # every shard holds some persons' counts
    assert len({cluster.get_node_from_key(key).name for key in spread}) >= 2  # on more than one master
    on_cluster, on_one = answers
    for index, (a, b) in enumerate(zip(on_cluster, on_one, strict=True)):
        assert a == b, f"answer {index} differs"
    trend = on_one[3]["result"][0]
    assert sum(trend["data"]) > 0  # real numbers, not two empty answers
    funnel = on_one[2]["result"]
    assert sum(b[0]["count"] for b in funnel) > sum(b[2]["count"] for b in funnel) > 0
