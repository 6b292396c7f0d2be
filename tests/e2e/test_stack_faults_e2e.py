"""Whole stacks stopped and killed as users and machines do: no acknowledged event is lost.

Each test runs its own `insightflow up` (Redis, Tansu, dataflow, API) on a temporary data dir.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer

from state.registry import DefinitionRegistry, Registry
from tests import legacy
from tests.upstack import Sender, Up, day_total

pytestmark = pytest.mark.e2e


def _project(up: Up, project_id: int) -> str:
    registry = Registry(up.redis)
    token = f"phc_faults_{project_id}"
    registry.save_project(project_id, token=token)
    return token


def test_stop_drains_then_a_restart_has_every_acknowledged_event(tmp_path: Path) -> None:
    """SIGINT while the dataflow is behind: capture refuses new events, the dataflow applies every
    acknowledged one, then the stack stops. The embedded broker keeps nothing, so anything not applied
    before the stop would be gone for good after the restart."""
    data_dir = tmp_path / "data"
    up = Up.start(data_dir)
    try:
        token = _project(up, 31)
        # Poison stored as an older version left it, and a record no one can use on the topic.
        h, stored = legacy.funnel_definition(31, 64)
        legacy.register(up.redis, 31, h, stored)
        producer = Producer({"bootstrap.servers": json.loads((data_dir / "stack.json").read_text())[
            "INSIGHTFLOW_KAFKA_BOOTSTRAP"]})
        producer.produce("events", value=b"not an event")
        assert producer.flush(10) == 0
        sender = Sender(up.url, token, batch=500, threads=3, retry=False)
        deadline = time.monotonic() + 60
        behind = 0
        while time.monotonic() < deadline and (len(sender.acknowledged) < 20_000 or not behind):
            behind = up.readyz().get("lag_events") or 0
        assert behind > 0, "the dataflow never fell behind capture: nothing to drain"
        code = up.stop(signal.SIGINT)
        sender.stop()
    finally:
        up.kill()
    assert code == 0, up.seen
    assert any(line.startswith("stopping: capture refuses new events") for line in up.seen), up.seen
    assert "stopping: every acknowledged event is applied" in up.seen, "\n".join(
        [*up.seen, f"sender: {sender.statuses}", "api.log:", up.log_tail("api"),
         "dataflow.log:", up.log_tail("dataflow")])
    assert set(sender.statuses) <= {"200", "503", "ConnectError", "RemoteProtocolError", "ReadError"}, sender.statuses
    # Whether a sender's request fell inside the drain depends on how fast the dataflow caught up;
    # what capture answers once draining is checked on the restarted stack below.

    again = Up.start(data_dir)  # with the stored poison: no crash loop
    try:
        again.wait_applied()
        assert day_total(again.redis, 31, "burst") == len(sender.acknowledged)
        assert again.readyz()["dlq_events"] == 1  # the count outlives the broker's topics
        assert "at most 32 steps" in (DefinitionRegistry(again.redis).failure(31, h) or "")
        reply = httpx.post(f"{again.url}/batch/", json={"api_key": token, "batch": _burst(50)}, timeout=30)
        assert reply.status_code == 200
        again.wait_applied()
        assert day_total(again.redis, 31, "burst") == len(sender.acknowledged) + 50
        assert again.pids()["dataflow"] == int((data_dir / "pids" / "dataflow.pid").read_text())
        assert not [line for line in again.output() if "exited" in line], again.seen
        # The broker lost its topics with the stop: a definition asked for now is built from the
        # archive the dataflow wrote, so it counts every event from before the restart too.
        key, _ = Registry(again.redis).create_key([31], ["insight:read"])
        reply = httpx.post(f"{again.url}/api/environments/31/insights/trend/", timeout=120,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"events": [{"id": "burst"}], "breakdown": "$browser",
                                 "date_from": "-1d", "refresh": "blocking"})
        assert reply.status_code == 200, reply.text
        assert sum(r["count"] for r in reply.json()["result"]) == len(sender.acknowledged) + 50, reply.text
        fresh = _project(again, 33)  # a project whose events all arrived after: its definitions build
        key, _ = Registry(again.redis).create_key([33], ["insight:read"])
        assert httpx.post(f"{again.url}/batch/", json={"api_key": fresh, "batch": _burst(20)}, timeout=30).is_success
        again.wait_applied()
        reply = httpx.post(f"{again.url}/api/environments/33/insights/trend/", timeout=60,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"events": [{"id": "burst"}], "breakdown": "$browser", "date_from": "-1d",
                                 "refresh": "blocking"})
        assert reply.status_code == 200 and sum(r["count"] for r in reply.json()["result"]) == 20, reply.text
        os.kill(again.pids()["api"], signal.SIGUSR1)  # what `up` sends when it starts draining
        deadline = time.monotonic() + 10
        while True:
            refused = httpx.post(f"{again.url}/batch/", json={"api_key": token, "batch": _burst(1)}, timeout=30)
            if refused.status_code == 503 or time.monotonic() > deadline:
                break
        assert refused.status_code == 503 and refused.json()["code"] == "draining", refused.text
        assert refused.headers["retry-after"]
    finally:
        again.kill()


def test_an_api_restarted_while_draining_is_told_again_to_refuse_events(tmp_path: Path) -> None:
    """The API dies just after the stop began (it took the signal, then was killed): `up` restarts it,
    and the new one knows nothing of the stop. A lag of 0 then means nothing while capture accepts, so
    `up` tells it again and only ends once it refuses and every acknowledged event is applied."""
    data_dir = tmp_path / "data"
    up = Up.start(data_dir)
    try:
        token = _project(up, 34)
        sender = Sender(up.url, token, batch=200, threads=2, retry=False)
        while len(sender.acknowledged) < 5_000:
            time.sleep(0.05)
        api = up.pids()["api"]
        os.kill(up.proc.pid, signal.SIGINT)
        up.wait_for("stopping: capture refuses new events", 30)
        os.kill(api, signal.SIGKILL)
        up.wait_for("restarted api", 30)
        up.wait_for("stopping: the API does not report that it refuses events yet; telling it again", 30)
        code = up.proc.wait(180)  # already stopping (a second Ctrl-C would stop at once)
        time.sleep(0.2)
        up.output()
    finally:
        sender.stop()
        up.kill()
    assert code == 0, up.seen
    assert "stopping: every acknowledged event is applied" in up.seen, "\n".join(up.seen)
    again = Up.start(data_dir)
    try:
        again.wait_applied()
        # Every acknowledged event is there; a request the kill cut off got no answer, and its events
        # may have reached the broker first (an SDK resends them with the same uuids: counted once).
        total = day_total(again.redis, 34, "burst")
        assert len(sender.acknowledged) <= total <= len(sender.acknowledged) + len(sender.unanswered), (
            total, len(sender.acknowledged), len(sender.unanswered))
    finally:
        again.kill()


def test_redis_killed_during_capture_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    """kill -9 of Redis (its last second of writes may be lost): `up` reaps and restarts it on its
    data dir; capture never answers 500; the dataflow waits, then re-applies what Redis lost; queries
    answer 503 with Retry-After while it is away."""
    up = Up.start(tmp_path / "data")
    try:
        token = _project(up, 32)
        registry = Registry(up.redis)
        key, _ = registry.create_key([32], ["insight:read"])
        sender = Sender(up.url, token, batch=200, threads=2)
        while len(sender.acknowledged) < 5_000:
            time.sleep(0.05)
        killed = up.pids()["redis"]
        os.kill(killed, signal.SIGKILL)
        gap = httpx.post(f"{up.url}/api/environments/32/insights/trend/", json={"events": [{"id": "burst"}]},
                         headers={"Authorization": f"Bearer {key}"}, timeout=10)
        readyz = httpx.get(f"{up.url}/readyz", timeout=10)
        up.wait_for("restarted redis", 30)
        time.sleep(3)  # capture goes on after the restart too
        sender.stop()
        up.wait_applied(120)
        assert day_total(up.redis, 32, "burst") == len(sender.acknowledged)
        assert "500" not in sender.statuses and set(sender.statuses) <= {"200", "503"}, sender.statuses
        assert up.pids()["redis"] != killed
        with pytest.raises(ProcessLookupError):
            os.kill(killed, 0)  # reaped, not a zombie
        if gap.status_code != 200:  # Redis may already be back when the query arrives
            assert gap.status_code == 503 and gap.headers["retry-after"], gap.text
        if readyz.status_code != 200:
            assert readyz.status_code == 503 and "Redis is unreachable" in readyz.json()["redis_error"]
    finally:
        up.kill()


def test_redis_back_without_its_last_writes_is_caught_up(tmp_path: Path) -> None:
    """Redis restarting from an append-only file that misses its last writes (what a machine crash
    between syncs leaves, reproduced with an older copy of its data dir): the dataflow notices at its
    next batch, restarts, and re-applies from the offsets Redis has. Nothing lost, nothing doubled."""
    import shutil

    data_dir = tmp_path / "data"
    up = Up.start(data_dir)
    try:
        token = _project(up, 33)
        sent = 0
        for _ in range(10):
            reply = httpx.post(f"{up.url}/batch/", json={"api_key": token, "batch": _burst(300)}, timeout=30)
            assert reply.status_code == 200
            sent += 300
        up.wait_applied()
        up.redis.execute_command("BGREWRITEAOF")
        time.sleep(1)
        shutil.copytree(data_dir / "redis", tmp_path / "older")
        for _ in range(10):
            assert httpx.post(f"{up.url}/batch/", json={"api_key": token, "batch": _burst(300)},
                              timeout=30).status_code == 200
            sent += 300
        up.wait_applied()
        assert day_total(up.redis, 33, "burst") == sent

        os.kill(up.proc.pid, signal.SIGSTOP)  # hold the supervisor while the data dir is swapped
        try:
            redis_pid = up.pids()["redis"]
            os.kill(redis_pid, signal.SIGKILL)
            time.sleep(1)
            shutil.rmtree(data_dir / "redis")
            shutil.copytree(tmp_path / "older", data_dir / "redis")
        finally:
            os.kill(up.proc.pid, signal.SIGCONT)
        up.wait_for("restarted redis", 30)
        deadline = time.monotonic() + 30
        while day_total(up.redis, 33, "burst") >= sent and time.monotonic() < deadline:
            time.sleep(0.1)  # Redis is back with the older state (it may take a moment to load)
        assert day_total(up.redis, 33, "burst") < sent
        assert httpx.post(f"{up.url}/batch/", json={"api_key": token, "batch": _burst(300)},
                          timeout=30).status_code == 200
        sent += 300
        up.wait_for("restarted dataflow", 60)
        up.wait_applied(120)
        assert day_total(up.redis, 33, "burst") == sent
    finally:
        up.kill()


def _burst(n: int) -> list[dict[str, str]]:
    return [{"event": "burst", "distinct_id": f"d{i % 37}", "uuid": str(uuid.uuid4())} for i in range(n)]
