"""Test harness: a real Redis and a real Tansu broker on free ports, the dataflow and the API.

Tests live in `unit/` (pure code, no services) and `e2e/` (through the broker, the dataflow, Redis and
HTTP); the helpers they share (`upstack.py`, `conformance.py`, `oracle.py`, …) stay here.

The stack is started once per session with the same `serving.stack` functions `insightflow up`
uses. Tests isolate themselves by project id, not by restarting services.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from schemas.projects import Project
from serving import stack
from state.connection import connect
from state.registry import Registry
from tests.upstack import wait_lag_zero

_project_ids = itertools.count(1000)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`tests/unit/` needs no services, `tests/e2e/` crosses process boundaries: marked by folder, so
    `pytest -m unit` runs in seconds anywhere."""
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in ("unit", "e2e"):
            item.add_marker(getattr(pytest.mark, folder))


@dataclass
class Services:
    redis_url: str
    bootstrap: str
    redis_proc: stack.Managed
    broker_proc: stack.Managed
    workdir: Path


@dataclass
class Stack:
    services: Services
    api_url: str
    env: dict[str, str]
    dataflow: stack.Managed
    api: stack.Managed
    recovery_dir: Path
    logs: Path

    @property
    def redis(self) -> redis.Redis:
        return connect(self.services.redis_url)

    def restart_dataflow(self, kill9: bool = True) -> None:
        if kill9:
            self.dataflow.kill9()
        else:
            self.dataflow.stop()
        self.dataflow = stack.start_dataflow(self.recovery_dir, self.logs, self.env)

    def readyz(self) -> dict[str, Any]:
        return httpx.get(f"{self.api_url}/readyz", timeout=5).json()

    def dead_letters(self, until: Callable[[list[tuple[bytes, dict[str, str]]]], bool],
                     timeout: float = 30.0) -> list[tuple[bytes, dict[str, str]]]:
        """Every record of `events_dlq` (value, headers), read until `until` holds for them."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.services.bootstrap, "group.id": "tests-dlq",
                             "enable.auto.commit": False})
        consumer.assign([TopicPartition("events_dlq", p, 0) for p in range(4)])
        found: list[tuple[bytes, dict[str, str]]] = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and not until(found):
                message = consumer.poll(0.2)
                if message is not None and not message.error():
                    headers = {k: v.decode() for k, v in message.headers() or []}
                    found.append((message.value() or b"", headers))
        finally:
            consumer.close()
        return found

    def wait_applied(self, timeout: float = 60.0) -> None:
        """Until every event accepted so far is reflected in served state (lag_events == 0)."""

        def alive() -> None:
            if not self.dataflow.alive():
                raise AssertionError(f"dataflow died; log tail:\n{_tail(self.dataflow.log_path)}")

        wait_lag_zero(self.readyz, timeout, lambda: _tail(self.dataflow.log_path), alive)


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One Redis server, or with `INSIGHTFLOW_TEST_REDIS=cluster` a Redis Cluster of 3 masters (the
    whole suite then runs on the cluster; tests that stop Redis stop its first node)."""
    workdir = tmp_path_factory.mktemp("services")
    if os.environ.get("INSIGHTFLOW_TEST_REDIS") == "cluster":
        nodes, redis_url = stack.start_redis_cluster(workdir / "redis", workdir / "logs")
    else:
        node, redis_url = stack.start_redis(workdir / "redis", workdir / "logs")
        nodes = [node]
    broker_proc, bootstrap = stack.start_tansu(workdir / "logs")
    yield Services(redis_url, bootstrap, nodes[0], broker_proc, workdir)
    broker_proc.stop()
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def running(services: Services) -> Iterator[Stack]:
    from state.topics import ensure_topics

    env = {"INSIGHTFLOW_REDIS_URL": services.redis_url, "INSIGHTFLOW_KAFKA_BOOTSTRAP": services.bootstrap,
           "INSIGHTFLOW_TOPIC": "events", "INSIGHTFLOW_TEST_CLOCK": "1", "INSIGHTFLOW_PARTITIONS": "4",
           "INSIGHTFLOW_ARCHIVE_DIR": str(stack.archive_dir(services.workdir))}  # the dataflow writes, the API reads
    ensure_topics(services.bootstrap, ["events", "events_dlq"], 4)
    logs = services.workdir / "logs"
    recovery = services.workdir / "recovery"
    dataflow = stack.start_dataflow(recovery, logs, env)
    port = stack.free_port()
    api = stack.start_api(port, logs, env)
    running = Stack(services, f"http://127.0.0.1:{port}", env, dataflow, api, recovery, logs)
    yield running
    running.api.stop()
    running.dataflow.stop()


@dataclass
class ProjectHandle:
    project: Project
    key: str
    stack: Stack

    @property
    def id(self) -> int:
        return self.project.id

    @property
    def token(self) -> str:
        return self.project.token

    def capture(self, events: list[dict[str, Any]], path: str = "/batch/", **envelope: Any) -> httpx.Response:
        return httpx.post(f"{self.stack.api_url}{path}",
                          json={"api_key": self.token, "batch": events, **envelope}, timeout=30)

    def trend(self, query: dict[str, Any], now: str | None = None, method: str = "POST",
              prefix: str = "environments", key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        if now:
            headers["X-Insightflow-Now"] = now
        url = f"{self.stack.api_url}/api/{prefix}/{self.id}/insights/trend/"
        if method == "GET":
            import orjson

            params = {k: (v if isinstance(v, str) else orjson.dumps(v).decode()) for k, v in query.items()}
            return httpx.get(url, params=params, headers=headers, timeout=30)
        return httpx.post(url, json=query, headers=headers, timeout=30)


@pytest.fixture
def project(running: Stack) -> ProjectHandle:
    return make_project(running)


def make_project(running: Stack, timezone: str = "UTC", **settings: Any) -> ProjectHandle:
    registry = Registry(running.redis)
    project = registry.save_project(next(_project_ids), timezone=timezone, **settings)
    key, _ = registry.create_key([project.id], ["insight:read"])
    return ProjectHandle(project, key, running)
