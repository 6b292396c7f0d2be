"""Redis Cluster: a dataflow and API on a 3-master cluster, each project's state spread over three
state shards, answer exactly what they answer on one Redis with one shard.

The cluster stack (its own masters, topic and dead-letter topic on the session's broker) and the
session's single-Redis stack are given the same events through capture and asked the same questions:
definitions kept live while the events arrive, and definitions built afterwards by backfill.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving import stack
from state import keys
from state.connection import connect, is_cluster
from state.topics import ensure_topics
from tests.conftest import Services, Stack
from tests.e2e.test_cluster_e2e import FILTERED, FUNNEL, LATER, PROJECT, StackClient, _events
from tests.e2e.test_merge_properties import (
    BY_BROWSER,
    ORDERED,
    PATHS,
    Api,
    answers,
    final_persons,
    oracle,
    stream,
    wait_summarised,
)
from tests.upstack import wait_lag_zero

pytestmark = pytest.mark.e2e


def _wait_applied(url: str) -> None:
    wait_lag_zero(lambda: httpx.get(f"{url}/readyz", timeout=5).json(), 180, lambda: "", lambda: None)


@pytest.fixture(scope="module")
def cluster_stack(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
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
        yield f"http://127.0.0.1:{port}", url
    finally:
        api.stop()
        dataflow.stop()
        for node in nodes:
            node.stop()


def test_a_cluster_answers_what_one_redis_answers(cluster_stack: tuple[str, str], running: Stack) -> None:
    api, url = cluster_stack
    cluster = connect(url)
    assert is_cluster(cluster)
    targets = [StackClient(api, cluster, "phc_rc"), StackClient(running.api_url, running.redis, "phc_rc_single")]
    events = _events()
    answers: list[list[Any]] = [[], []]
    for target, found in zip(targets, answers, strict=True):
        found += [target.ask("funnel/", FUNNEL), target.ask("trend/", FILTERED)]  # kept live from here
        target.capture(events)
    for target, found in zip(targets, answers, strict=True):
        _wait_applied(target.url)
        found += [target.ask("funnel/", FUNNEL), target.ask("trend/", FILTERED)]
        found += [target.ask(path, body) for path, body in LATER]
    spread = keys.in_shards(keys.day_counts(PROJECT, "$pageview"), 3)  # project 41 on both stacks
    assert all(cluster.exists(key) for key in spread)  # every shard holds some persons' counts
    assert len({cluster.get_node_from_key(key).name for key in spread}) >= 2  # on more than one master
    on_cluster, on_one = answers
    for index, (a, b) in enumerate(zip(on_cluster, on_one, strict=True)):
        assert a == b, f"answer {index} differs"
    trend = on_one[3]["result"][0]
    assert sum(trend["data"]) > 0  # real numbers, not two empty answers
    funnel = on_one[2]["result"]
    assert sum(b[0]["count"] for b in funnel) > sum(b[2]["count"] for b in funnel) > 0


def test_merged_persons_spread_over_state_shards_count_once(cluster_stack: tuple[str, str]) -> None:
    """Sign-up flows and dangerous merges captured in a shuffled order: a merged person and its
    survivor usually sit in different state shards (on different masters), and every answer still
    equals the batch computation over final persons, before and after the summariser folds them."""
    api_url, url = cluster_stack
    cluster = connect(url)
    rng = random.Random(14)
    events = stream(rng, personas=40)
    expected = oracle(events, final_persons(events))
    target = StackClient(api_url, cluster, "phc_rc_merges", project_id=PROJECT + 1)
    api = Api(api_url, target.project_id, target.key)
    for path, body in (("funnel/", ORDERED), ("funnel/", BY_BROWSER), ("path/", PATHS)):
        api.post(path, body)
    shuffled = events[:]
    rng.shuffle(shuffled)
    target.capture(shuffled)
    _wait_applied(api_url)
    assert answers(api) == expected
    merged = {int(s): int(t) for s, t in cluster.hgetall(keys.merged(target.project_id)).items()}
    assert any(s % 3 != t % 3 for s, t in merged.items())  # some merges cross state shards
    wait_summarised(cluster, target.project_id)
    assert answers(api) == expected
