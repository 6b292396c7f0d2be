"""Capture -> Kafka -> dataflow -> Redis -> trend API, and capture's handling of bad input."""

from __future__ import annotations

import base64
import gzip
import uuid
from urllib.parse import urlencode

import httpx
import orjson
import pytest

from serving import stack as stack_mod
from state.registry import Registry
from tests.conftest import ProjectHandle, Stack

NOW = "2024-03-07T15:00:00Z"


def _pageviews(n: int, distinct_id: str = "u1", day: str = "2024-03-05") -> list[dict]:
    return [{"event": "$pageview", "distinct_id": distinct_id, "timestamp": f"{day}T10:00:{i % 60:02d}Z",
             "uuid": str(uuid.uuid4()), "properties": {"$current_url": "/"}} for i in range(n)]


def test_capture_to_trend(project: ProjectHandle, running: Stack) -> None:
    events = (_pageviews(3, "a", "2024-03-04") + _pageviews(2, "b", "2024-03-04") + _pageviews(4, "a", "2024-03-06")
              + [{"event": "signed up", "distinct_id": "b", "timestamp": "2024-03-06T23:59:59Z"}])
    reply = project.capture(events)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"status": 1}
    running.wait_applied()

    query = {"events": [{"id": "$pageview", "math": "dau"}, {"id": "$pageview"}, {"id": "signed up", "order": 5}],
             "date_from": "-3d", "interval": "day"}
    body = project.trend(query, now=NOW).json()
    assert body["timezone"] == "UTC" and body["is_cached"] is False and body["next"] is None
    dau, total, signups = body["result"]
    assert dau["data"] == [2, 0, 1, 0]
    assert dau["days"] == ["2024-03-04", "2024-03-05", "2024-03-06", "2024-03-07"]
    assert dau["labels"] == ["4-Mar-2024", "5-Mar-2024", "6-Mar-2024", "7-Mar-2024"]
    assert dau["label"] == "$pageview" and dau["count"] == 3.0 and dau["order"] == 0
    assert dau["action"]["math"] == "dau" and dau["action"]["days"][0] == "2024-03-04T00:00:00Z"
    assert total["data"] == [5, 0, 4, 0] and total["count"] == 9.0
    assert signups["data"] == [0, 0, 1, 0] and signups["label"] == "signed up"

    # GET with JSON-encoded fields, and the /api/projects/ prefix, give the same numbers.
    got = project.trend(query, now=NOW, method="GET", prefix="projects").json()
    assert [r["data"] for r in got["result"]] == [[2, 0, 1, 0], [5, 0, 4, 0], [0, 0, 1, 0]]

    hourly = project.trend({"events": [{"id": "$pageview"}], "interval": "hour", "date_from": "2024-03-04T09:00:00Z",
                            "date_to": "2024-03-04T11:00:00Z"}, now=NOW).json()["result"][0]
    assert hourly["data"] == [0, 5, 0]
    assert hourly["days"] == ["2024-03-04 09:00:00", "2024-03-04 10:00:00", "2024-03-04 11:00:00"]
    assert hourly["labels"] == ["4-Mar 09:00", "4-Mar 10:00", "4-Mar 11:00"]


def test_resent_batch_counts_once(project: ProjectHandle, running: Stack) -> None:
    events = _pageviews(5, "r1", "2024-03-05")
    assert project.capture(events).status_code == 200
    assert project.capture(events).status_code == 200  # an SDK retry after a timeout: same uuids
    running.wait_applied()
    data = project.trend({"events": [{"id": "$pageview"}], "date_from": "2024-03-05", "date_to": "2024-03-05"},
                         now=NOW).json()["result"][0]["data"]
    assert data == [5]


def test_capture_variants(project: ProjectHandle, running: Stack) -> None:
    api = running.api_url
    one = {"event": "$pageview", "distinct_id": "v", "timestamp": "2024-03-05T01:00:00Z", "api_key": project.token}
    # Single event on /capture/, /e/ and /i/v0/e/.
    for path in ("/capture/", "/e/", "/i/v0/e/"):
        reply = httpx.post(f"{api}{path}", json={**one, "uuid": str(uuid.uuid4())})
        assert reply.status_code == 200, (path, reply.text)
    # gzip body (posthog-python's gzip mode).
    body = gzip.compress(orjson.dumps({"api_key": project.token, "batch": _pageviews(2, "v", "2024-03-05")}))
    reply = httpx.post(f"{api}/batch/", content=body, headers={"Content-Encoding": "gzip",
                                                                "Content-Type": "application/json"})
    assert reply.status_code == 200, reply.text
    # Form-encoded data= with base64 (posthog-js legacy transport), token inside properties.
    js_event = {"event": "$pageview", "properties": {"distinct_id": "v", "token": project.token},
                "timestamp": "2024-03-05T02:00:00Z", "uuid": str(uuid.uuid4())}
    form = urlencode({"data": base64.b64encode(orjson.dumps([js_event])).decode()})
    reply = httpx.post(f"{api}/e/", content=form, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 200, reply.text
    # gzip-js compression flag in the query string.
    reply = httpx.post(f"{api}/e/?compression=gzip-js",
                       content=gzip.compress(orjson.dumps([{**js_event, "uuid": str(uuid.uuid4())}])))
    assert reply.status_code == 200, reply.text
    running.wait_applied()
    data = project.trend({"events": [{"id": "$pageview"}], "date_from": "2024-03-05", "date_to": "2024-03-05"},
                         now=NOW).json()["result"][0]["data"]
    assert data == [3 + 2 + 1 + 1]


def test_clock_skew_correction(project: ProjectHandle, running: Stack) -> None:
    """timestamp is shifted by (server now - sent_at): a client clock 2 days fast lands today."""
    from datetime import UTC, datetime, timedelta

    client_now = datetime.now(UTC) + timedelta(days=2)
    event = {"event": "skewed", "distinct_id": "s", "timestamp": client_now.isoformat()}
    assert project.capture([event], sent_at=client_now.isoformat()).status_code == 200
    running.wait_applied()
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    reply = project.trend({"events": [{"id": "skewed"}], "date_from": today, "date_to": today})
    assert reply.json()["result"][0]["data"] == [1]


@pytest.mark.parametrize(
    ("content", "headers", "status", "code", "needle"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "invalid_payload", "not valid JSON"),
        (b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400, "invalid_payload", "not valid gzip"),
        (b"", {}, 400, "invalid_payload", "empty"),
        (b"42", {}, 400, "invalid_payload", "expected a JSON object"),
    ],
)
def test_malformed_bodies(running: Stack, content: bytes, headers: dict, status: int, code: str, needle: str) -> None:
    reply = httpx.post(f"{running.api_url}/batch/", content=content, headers=headers)
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) >= {"type", "code", "detail", "attr"}
    assert body["type"] == "validation_error" and body["code"] == code and needle in body["detail"]


def test_token_errors(running: Stack) -> None:
    event = {"event": "x", "distinct_id": "d"}
    missing = httpx.post(f"{running.api_url}/batch/", json={"batch": [event]})
    assert missing.status_code == 401 and missing.json()["code"] == "invalid_api_key"
    assert "not provided" in missing.json()["detail"]
    unknown = httpx.post(f"{running.api_url}/batch/", json={"api_key": "phc_nope", "batch": [event]})
    assert unknown.status_code == 401 and "invalid" in unknown.json()["detail"]


def test_bad_events_rejected_good_ones_kept(project: ProjectHandle, running: Stack) -> None:
    good = _pageviews(2, "k", "2024-03-05")
    batch = [good[0], {"distinct_id": "k"}, {"event": "$pageview", "distinct_id": ["not", "a", "string"]},
             {"event": "$pageview", "distinct_id": "k", "timestamp": "yesterday-ish"},
             {"event": "$pageview", "distinct_id": "k", "properties": "oops"},
             {"event": "$pageview", "distinct_id": "k", "properties": {"blob": "x" * (1024 * 1024)}},
             good[1]]
    reply = project.capture(batch)
    assert reply.status_code == 400
    body = reply.json()
    assert body["code"] == "invalid_payload" and body["attr"] == "batch__1"
    assert body["accepted"] == 2
    rejected = {r["index"]: r["detail"] for r in body["rejected"]}
    assert set(rejected) == {1, 2, 3, 4, 5}
    assert "'event' is required" in rejected[1]
    assert "distinct_id" in rejected[2]
    assert "timestamp" in rejected[3]
    assert "properties" in rejected[4]
    assert "larger than" in rejected[5]
    running.wait_applied()
    data = project.trend({"events": [{"id": "$pageview"}], "date_from": "2024-03-05", "date_to": "2024-03-05"},
                         now=NOW).json()["result"][0]["data"]
    assert data == [2]
    oversized = project.capture([{"event": "big", "distinct_id": "k", "properties": {"b": "x" * (1024 * 1024)}}])
    assert oversized.status_code == 413


def test_broker_unreachable_is_503(running: Stack, tmp_path) -> None:
    dead_port = stack_mod.free_port()
    env = {**running.env, "INSIGHTFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{dead_port}"}
    port = stack_mod.free_port()
    api = stack_mod.start_api(port, tmp_path, env)
    try:
        project = Registry(running.redis).save_project(99_999)
        reply = httpx.post(f"http://127.0.0.1:{port}/batch/", timeout=30,
                           json={"api_key": project.token, "batch": [{"event": "x", "distinct_id": "d"}]})
        assert reply.status_code == 503
        assert reply.json()["code"] == "broker_unavailable"
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["kafka"] is False and ready.json()["redis"] is True
    finally:
        api.stop()


def test_dead_letter_topic(project: ProjectHandle, running: Stack) -> None:
    """Records put straight on the topic that cannot be used go to events_dlq with the reason, counted."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    before = running.readyz()["dlq_events"]
    producer = Producer({"bootstrap.servers": running.services.bootstrap})
    producer.produce("events", value=b"definitely not json")
    producer.produce("events", value=orjson.dumps({"event": "x", "distinct_id": "d", "project_id": 123456789,
                                                   "timestamp": "2024-03-05T00:00:00Z"}))
    good = {"event": "direct", "distinct_id": "d", "token": project.token, "timestamp": "2024-03-05T00:00:00Z"}
    producer.produce("events", value=orjson.dumps(good))
    producer.flush(10)
    running.wait_applied()
    import time

    deadline = time.monotonic() + 20
    while running.readyz()["dlq_events"] < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running.readyz()["dlq_events"] == before + 2
    consumer = Consumer({"bootstrap.servers": running.services.bootstrap, "group.id": "t", "enable.auto.commit": False})
    consumer.assign([TopicPartition("events_dlq", p, 0) for p in range(4)])
    reasons = set()
    deadline = time.monotonic() + 20
    while len(reasons) < 2 and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and not message.error():
            reasons.add(dict(message.headers())["reason"].decode())
    consumer.close()
    assert any("not valid JSON" in r for r in reasons)
    assert any("unknown project 123456789" in r for r in reasons)
    data = project.trend({"events": [{"id": "direct"}], "date_from": "2024-03-05", "date_to": "2024-03-05"},
                         now=NOW).json()["result"][0]["data"]
    assert data == [1]


def test_health_and_metrics(project: ProjectHandle, running: Stack) -> None:
    assert httpx.get(f"{running.api_url}/healthz").json() == {"status": "ok"}
    assert project.capture(_pageviews(3, "m", "2024-03-05")).status_code == 200
    metrics = httpx.get(f"{running.api_url}/metrics").text
    captured = [line for line in metrics.splitlines() if line.startswith("insightflow_captured_events_total ")]
    assert captured and float(captured[0].split()[1]) >= 3
    running.wait_applied()
    ready = running.readyz()
    assert ready["redis"] is True and ready["kafka"] is True and ready["lag_events"] == 0
