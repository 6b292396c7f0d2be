"""One request cannot stall the API: heavy queries run in worker processes within a time budget."""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from serving import stack
from tests.conftest import ProjectHandle, Stack, make_project

pytestmark = pytest.mark.e2e

NOW = "2024-12-31T12:00:00Z"
HEAVY = {"events": [{"id": "$pageview", "math": "weekly_active"}], "interval": "hour",
         "date_from": "2024-01-01", "date_to": "2024-12-31"}


@pytest.fixture(scope="module")
def year(running: Stack) -> ProjectHandle:
    """A year of pageviews by 3,000 persons."""
    project = make_project(running)
    rng = random.Random(11)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    events = [{"event": "$pageview", "distinct_id": f"p{rng.randrange(3000)}", "uuid": str(uuid.uuid4()),
               "timestamp": (start + timedelta(seconds=rng.randrange(366 * 86400))).isoformat()}
              for _ in range(30_000)]
    for i in range(0, len(events), 5000):
        assert project.capture(events[i:i + 5000]).status_code == 200
    running.wait_applied()
    return project


def test_capture_and_health_stay_responsive_during_a_heavy_query(running: Stack, year: ProjectHandle) -> None:
    latencies: list[float] = []
    answered: list[float] = []  # when each capture was answered
    health: list[float] = []
    stop = threading.Event()

    def capture() -> None:
        with httpx.Client(timeout=15) as client:
            while not stop.is_set():
                started = time.perf_counter()
                reply = client.post(f"{running.api_url}/capture/", json={
                    "api_key": year.token, "event": "during", "distinct_id": "x", "uuid": str(uuid.uuid4())})
                ended = time.perf_counter()
                latencies.append((ended - started) * 1000)
                answered.append(ended)
                assert reply.status_code == 200
                time.sleep(0.02)

    def healthz() -> None:
        with httpx.Client(timeout=15) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get(f"{running.api_url}/healthz").status_code == 200
                health.append((time.perf_counter() - started) * 1000)
                time.sleep(0.05)

    threads = [threading.Thread(target=capture), threading.Thread(target=healthz)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.perf_counter()
    heavy = year.trend(HEAVY, now=NOW)
    finished = time.perf_counter()
    took = finished - started
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    assert heavy.status_code == 200, heavy.text
    assert len(heavy.json()["result"][0]["data"]) == 365 * 24 + 1  # through 2024-12-31T00:00
    assert took > 0.3, "the query was too light to show anything"
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"capture p99 {p99:.0f} ms, max {max(latencies):.0f} ms during a {took:.1f} s query")
    # A capture that waited on the query would take about the query's time (seconds), and none would be
    # answered while it runs: that is what must not happen. The latency itself depends on the host: alone
    # p99 is about 30 ms; in the full suite, with the shared stack's dataflow busy on the same 2 cores, it
    # has reached 100-110 ms here and 280 ms on a loaded CI machine (max 357 ms).
    during = sum(started < moment < finished for moment in answered)
    assert during >= took / 0.5, f"only {during} captures answered during a {took:.1f} s query"
    assert p99 < 600 and max(latencies) < min(1000, took * 1000 / 3), \
        f"capture p99 {p99:.0f} ms, max {max(latencies):.0f} ms during a {took:.1f} s query"
    assert max(health) < min(1000, took * 1000 / 3) and len(health) >= took / 0.5, (max(health), len(health))


def test_a_query_over_its_budget_answers_504_and_the_next_one_is_answered(running: Stack, year: ProjectHandle,
                                                                        tmp_path) -> None:
    port = stack.free_port()
    api = stack.start_api(port, tmp_path / "logs", {**running.env, "INSIGHTFLOW_QUERY_TIMEOUT": "0.3",
                                                    "INSIGHTFLOW_QUERY_WORKERS": "1"})
    try:
        url = f"http://127.0.0.1:{port}/api/environments/{year.id}/insights/trend/"
        headers = {"Authorization": f"Bearer {year.key}", "X-Insightflow-Now": NOW}
        slow = httpx.post(url, json=HEAVY, headers=headers, timeout=30)
        assert slow.status_code == 504, slow.text
        assert slow.json()["code"] == "timeout" and "0.3 s" in slow.json()["detail"]
        deadline = time.monotonic() + 30
        while True:  # its worker was killed and is being replaced
            light = httpx.post(url, json={"events": [{"id": "$pageview"}], "date_from": "2024-12-01",
                                          "date_to": "2024-12-31"}, headers=headers, timeout=30)
            if light.status_code == 200 or time.monotonic() > deadline:
                break
        assert light.status_code == 200, light.text
        assert sum(light.json()["result"][0]["data"]) > 0
    finally:
        api.stop()


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the compute workers), in MB."""
    total = 0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            status = open(f"/proc/{current}/status").read()
            children = open(f"/proc/{current}/task/{current}/children").read().split()
        except FileNotFoundError:
            continue
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        pids += [int(c) for c in children]
    return total / 1024


def test_requests_too_big_to_answer_are_refused_before_any_work(running: Stack, year: ProjectHandle) -> None:
    series = {"events": [{"id": f"e{i}", "order": i} for i in range(10_000)], "date_from": "-7d"}
    reply = year.trend(series, now=NOW)
    assert reply.status_code == 400 and reply.json()["attr"] == "events", reply.text
    assert "At most 100 series" in reply.json()["detail"]
    window = {"events": [{"id": "$pageview", "order": 0}, {"id": "$pageview", "order": 1}],
              "funnel_window_interval": 10**12, "funnel_window_interval_unit": "day", "date_from": "-7d"}
    funnel = httpx.post(f"{running.api_url}/api/environments/{year.id}/insights/funnel/", json=window,
                        headers={"Authorization": f"Bearer {year.key}", "X-Insightflow-Now": NOW}, timeout=30)
    assert funnel.status_code == 400 and funnel.json()["attr"] == "funnel_window_interval", funnel.text
    hours = year.trend({**HEAVY, "date_from": "2000-01-01", "date_to": "2024-12-31"}, now=NOW)
    assert hours.status_code == 400 and hours.json()["attr"] == "interval", hours.text
    assert "at most 10,000" in hours.json()["detail"]
    assert _rss_mb(running.api.proc.pid) < 1024


def _metric(running: Stack, name: str) -> float:
    text = httpx.get(f"{running.api_url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}_total "))


def test_identical_requests_in_flight_share_one_computation(running: Stack, year: ProjectHandle) -> None:
    query = {**HEAVY, "date_from": "2024-06-01", "date_to": "2024-12-31"}
    computed, shared = _metric(running, "insightflow_computations"), _metric(running, "insightflow_computations_shared")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: year.trend(query, now=NOW), range(6)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.content.split(b'"last_refresh"')[0] for a in answers}) == 1  # the same result for all
    ran = _metric(running, "insightflow_computations") - computed
    joined = _metric(running, "insightflow_computations_shared") - shared
    assert ran + joined == 6 and joined >= 3, (ran, joined)
