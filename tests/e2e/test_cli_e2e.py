"""`insightflow up` as a user runs it: its own Redis and Tansu, demo data, supervision, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from serving import stack
from serving.demo import DEMO_KEY, demo_events
from state.connection import claim_state_shards, connect, state_shards
from tests.upstack import ROOT, Up, clean_env


def _cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=60)


def test_up_with_demo_supervises_and_stops(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    up = Up.start(data_dir, demo=True)
    port = up.port
    try:
        assert up.seen[-1] == f"ready: http://127.0.0.1:{port}"
        pids = up.pids()
        assert set(pids) == {"redis", "broker", "dataflow", "api"}

        expected = Counter(e["timestamp"][:10] for e in demo_events() if e["event"] == "$pageview")
        first, last = min(expected), max(expected)
        query = {"events": [{"id": "$pageview"}], "date_from": first, "date_to": last}
        headers = {"Authorization": f"Bearer {DEMO_KEY}"}
        url = f"http://127.0.0.1:{port}/api/environments/1/insights/trend/"
        body = httpx.post(url, json=query, headers=headers, timeout=30).json()["result"][0]
        assert dict(zip(body["days"], body["data"], strict=True)) == {
            d: expected.get(d, 0) for d in body["days"]}
        assert sum(body["data"]) == sum(expected.values())

        # kill -9 the dataflow: up restarts it and says so; numbers stay exact.
        os.kill(pids["dataflow"], signal.SIGKILL)
        restarted = up.wait_for("restarted dataflow", 20)
        assert "pid" in restarted
        new_pid = int((data_dir / "pids" / "dataflow.pid").read_text())
        assert new_pid != pids["dataflow"]
        time.sleep(2)
        again = httpx.post(url, json=query, headers=headers, timeout=30).json()["result"][0]
        assert again["data"] == body["data"]

        # project and key commands reach the running stack through --data-dir.
        created = _cli("project", "create", "--id", "7", "--name", "Shop", "--timezone", "Europe/Berlin",
                       "--week-start", "1", data_dir=data_dir)
        assert created.returncode == 0, created.stderr
        project = json.loads(created.stdout)
        assert project["id"] == 7 and project["timezone"] == "Europe/Berlin" and project["token"].startswith("phc_")
        key = _cli("key", "create", "--project", "7", "--scopes", "insight:read", data_dir=data_dir)
        assert key.returncode == 0, key.stderr
        value = json.loads(key.stdout)["value"]
        reply = httpx.post(f"http://127.0.0.1:{port}/api/environments/7/insights/trend/", json=query,
                           headers={"Authorization": f"Bearer {value}"}, timeout=30)
        assert reply.status_code == 200 and reply.json()["timezone"] == "Europe/Berlin"
        bad = _cli("project", "create", "--id", "8", "--timezone", "Mars/Base", data_dir=data_dir)
        assert bad.returncode != 0 and "Unknown time zone" in bad.stderr
        code = up.stop(signal.SIGTERM)
    finally:
        up.kill()
    assert code == 0, up.seen
    alive = []
    for pid in pids.values():
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert alive == [], f"processes left running: {alive}"
    assert not list((data_dir / "pids").glob("*.pid"))


def _up_once(data_dir: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", "up", "--no-demo", "--api-port", str(port),
                           "--data-dir", str(data_dir)], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                          timeout=60)


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _up_once(tmp_path / "data", port)
    assert result.returncode == 1
    assert f"error: port {port} is already in use" in result.stdout
    assert not (tmp_path / "data" / "redis").exists() and not (tmp_path / "data" / "pids").exists()


def test_a_second_up_on_the_same_data_dir_is_refused_and_leaves_the_first_alone(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Up.start(data_dir)
    try:
        pids, stack_file = first.pids(), (data_dir / "stack.json").read_text()
        second = _up_once(data_dir, first.port + 1 if first.port < 65000 else first.port - 1)
        assert second.returncode == 1
        assert f"already running on {data_dir} (pid {first.proc.pid})" in second.stdout
        assert first.pids() == pids and (data_dir / "stack.json").read_text() == stack_file
        assert first.readyz().get("redis") is True
        code = first.stop(signal.SIGINT)
    finally:
        first.kill()
    assert code == 0
    said = first.output()
    assert any(line.startswith("stopping redis (pid") for line in said) and said[-1] == "stopped", said


def test_cluster_settings_that_cannot_work_are_refused_before_anything_starts(tmp_path: Path) -> None:
    for value in ("0", "two", "65"):
        env = {**clean_env(), "INSIGHTFLOW_DATAFLOW_PROCESSES": value}
        run = subprocess.run([sys.executable, "-m", "serving.cli", "up", "--no-demo", "--data-dir", str(tmp_path)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert run.returncode == 1, run.stdout + run.stderr
        assert "INSIGHTFLOW_DATAFLOW_PROCESSES must be a whole number from 1 to 64" in run.stdout
        assert not (tmp_path / "pids").exists() or not list((tmp_path / "pids").iterdir())
    run = subprocess.run([sys.executable, "-m", "serving.cli", "dataflow", "--recovery-dir", str(tmp_path / "r"),
                          "--process-id", "2", "--addresses", "a:1;b:2"],
                         capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=60)
    assert run.returncode == 2 and "--process-id 2 is not an index of the 2 addresses given" in run.stdout + run.stderr
    assert not (tmp_path / "r").exists()


def test_a_dataflow_with_another_number_of_state_shards_is_refused(tmp_path: Path) -> None:
    """The state was written with three state shards: a dataflow configured with two would read and
    write it in the wrong places, so it refuses to start and says what to do."""
    node, url = stack.start_redis(tmp_path / "redis", tmp_path / "logs")
    try:
        assert claim_state_shards(connect(url), 3) == 3
        for shards in ("2", "1"):
            env = {**clean_env(), "INSIGHTFLOW_REDIS_URL": url, "INSIGHTFLOW_STATE_SHARDS": shards}
            run = subprocess.run([sys.executable, "-m", "serving.cli", "dataflow", "--recovery-dir",
                                  str(tmp_path / "r")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
            assert run.returncode == 2, run.stdout + run.stderr
            assert (f"keeps each project's state in 3 state shard(s), but INSIGHTFLOW_STATE_SHARDS is {shards}"
                    in run.stdout)
        assert state_shards(connect(url)) == 3 and not (tmp_path / "r").exists()
    finally:
        node.stop()
