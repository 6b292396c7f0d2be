"""`insightflow replay` from an NDJSON export and from another topic; replays never double count."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import orjson
from confluent_kafka import Producer

from serving import stack as stack_mod
from tests.conftest import ProjectHandle, Stack

ROOT = Path(__file__).resolve().parents[2]
NOW = "2024-02-10T00:00:00Z"


def _cli(running: Stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **running.env}
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def _count(project: ProjectHandle, event: str) -> list[int]:
    return project.trend({"events": [{"id": event}], "date_from": "2024-02-01", "date_to": "2024-02-03"},
                         now=NOW).json()["result"][0]["data"]


def test_replay_export_file_twice(project: ProjectHandle, running: Stack, tmp_path: Path) -> None:
    lines = [orjson.dumps({"event": "imported", "distinct_id": f"i{i}", "uuid": str(uuid.uuid4()),
                           "timestamp": f"2024-02-0{1 + i % 3}T08:00:00Z"}) for i in range(30)]
    lines += [orjson.dumps({"event": "imported", "distinct_id": "no-uuid", "timestamp": "2024-02-01T09:00:00Z"})]
    lines += [b"{broken json", orjson.dumps({"distinct_id": "x", "timestamp": "2024-02-01T09:00:00Z"})]
    export = tmp_path / "export.ndjson"
    export.write_bytes(b"\n".join(lines) + b"\n")
    first = _cli(running, "replay", "--file", str(export), "--project", str(project.id))
    assert first.returncode == 0, first.stderr
    assert "replayed 31 events" in first.stdout and "2 unusable" in first.stdout
    assert "line 32" in first.stderr and "line 33" in first.stderr
    running.wait_applied()
    assert _count(project, "imported") == [11, 10, 10]
    again = _cli(running, "replay", "--file", str(export), "--project", str(project.id))
    assert again.returncode == 0, again.stderr
    running.wait_applied()
    assert _count(project, "imported") == [11, 10, 10]  # same uuids (or same content): nothing twice


def test_replay_from_topic(project: ProjectHandle, running: Stack) -> None:
    producer = Producer({"bootstrap.servers": running.services.bootstrap})
    for i in range(12):
        producer.produce("history", value=orjson.dumps({"event": "old", "distinct_id": f"h{i}",
                                                        "uuid": str(uuid.uuid4()), "token": project.token,
                                                        "timestamp": "2024-02-02T10:00:00Z"}))
    producer.flush(10)
    result = _cli(running, "replay", "--from-topic", "history")
    assert result.returncode == 0, result.stderr
    assert "replayed 12 events" in result.stdout
    running.wait_applied()
    assert _count(project, "old") == [0, 12, 0]


def test_api_and_dataflow_commands_start(running: Stack, tmp_path: Path) -> None:
    """The single-component commands the compose file runs."""
    port = stack_mod.free_port()
    api = stack_mod.spawn("api-cmd", [sys.executable, "-m", "serving.cli", "api", "--port", str(port)], tmp_path,
                          running.env)
    flow = stack_mod.spawn("dataflow-cmd", [sys.executable, "-m", "serving.cli", "dataflow", "--recovery-dir",
                                            str(tmp_path / "recovery")], tmp_path, {**running.env,
                                                                                      "INSIGHTFLOW_TOPIC": "other"})
    try:
        stack_mod.wait_port(port, 30, api.proc, "api")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        assert flow.alive() and any((tmp_path / "recovery").iterdir())
    finally:
        api.stop()
        flow.stop()


def test_archive_shows_and_exports_what_replay_archived(project: ProjectHandle, running: Stack,
                                                         tmp_path: Path) -> None:
    """Replayed events are archived once each (a second replay adds nothing); `insightflow archive`
    shows the project's coverage and exports its events as NDJSON that replay reads back."""
    sent = [{"event": "kept", "distinct_id": f"k{i % 4}", "uuid": str(uuid.uuid4()),
             "timestamp": f"2024-02-0{1 + i % 2}T08:00:{i:02d}Z", "properties": {"n": i, "$browser": "Chrome"}}
            for i in range(20)]
    export = tmp_path / "history.ndjson"
    export.write_bytes(b"\n".join(orjson.dumps(e) for e in sent) + b"\n")
    for _ in range(2):
        assert _cli(running, "replay", "--file", str(export), "--project", str(project.id)).returncode == 0
    running.wait_applied()
    archive_env = {"INSIGHTFLOW_ARCHIVE_DIR": str(running.services.workdir / "archive")}

    def archive(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serving.cli", "archive", *args], capture_output=True, text=True,
                              env={**os.environ, **running.env, **archive_env}, cwd=ROOT, timeout=120)

    shown = archive("--project", str(project.id), "--json")
    assert shown.returncode == 0, shown.stderr
    coverage = orjson.loads(shown.stdout)
    assert (coverage["project"], coverage["events"], coverage["days"]) == (project.id, 20, 2)
    assert (coverage["first_day"], coverage["last_day"]) == ("2024-02-01", "2024-02-02") and coverage["bytes"] > 0
    table = archive("--project", str(project.id))
    assert table.returncode == 0 and f"{project.id:>8} {20:>12,}" in table.stdout, table.stdout
    mine = tmp_path / "mine.ndjson"
    done = archive("--project", str(project.id), "--export", str(mine))
    assert done.returncode == 0 and f"exported 20 events of project {project.id}" in done.stdout, done.stderr
    exported = [orjson.loads(line) for line in mine.read_bytes().splitlines()]
    assert sorted((e["uuid"], e["event"], e["distinct_id"], e["properties"]["n"], e["project_id"])
                  for e in exported) == sorted((e["uuid"], e["event"], e["distinct_id"], e["properties"]["n"],
                                                project.id) for e in sent)
    assert [e["timestamp"] for e in exported] == sorted(e["timestamp"] for e in exported)
    assert _cli(running, "replay", "--file", str(mine)).returncode == 0  # read back: the same events, once
    running.wait_applied()
    assert _count(project, "kept") == [10, 10, 0]
    assert orjson.loads(archive("--project", str(project.id), "--json").stdout)["events"] == 20
    for args, says in ((["--export", str(mine)], "--export needs --project"),
                       (["--project", "987654", "--export", str(mine)], "holds no events of project 987654"),
                       (["--project", "abc"], "Invalid value for '--project'")):
        refused = archive(*args)
        said = " ".join(refused.stderr.replace("│", " ").split())  # typer boxes and wraps the message
        assert refused.returncode == 2 and says in said, refused.stderr
