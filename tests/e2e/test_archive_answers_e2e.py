"""Questions answered from the event archive's columns (serving/funnels.py, serving/paths.py): event
correlation, with nothing registered, a new ordered funnel and new paths while their definitions
build, and a built funnel while a backlog's persons wait to be summarised. The answers equal the
registered path's, which an API without the archive, or with an archive that lacks the project's
history, takes instead; merged persons included."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving import stack
from state import keys
from state.registry import DefinitionRegistry
from state.summaries import SummaryStore
from tests.conftest import ProjectHandle, Stack, make_project

BASE = datetime(2024, 6, 3, tzinfo=UTC)
NOW = "2024-06-20T00:00:00Z"
QUERY = {"events": [{"id": "$pageview", "order": 0}, {"id": "signed up", "order": 1}, {"id": "purchase", "order": 2}],
         "date_from": "2024-06-04", "date_to": "2024-06-12", "funnel_window_interval": 3,
         "funnel_window_interval_unit": "day", "funnel_correlation_type": "events"}


def _history(rng: random.Random) -> list[dict[str, Any]]:
    """Persons browsing, some signing up and buying; which side events they do leans on whether they
    convert. Some start anonymous and are identified later (their persons merge), and some events lie
    outside the range or the window."""
    events: list[dict[str, Any]] = []

    def add(name: str, who: str, at: datetime, **props: Any) -> None:
        events.append({"event": name, "distinct_id": who, "uuid": str(uuid.uuid4()), "timestamp": at.isoformat(),
                       "properties": {"$browser": rng.choice(["Chrome", "Safari"]), **props}})

    for i in range(160):
        who = f"anon-{i}" if i % 5 == 0 else f"u{i}"
        start = BASE + timedelta(days=rng.randrange(12), minutes=rng.randrange(600))
        add("$pageview", who, start, **{"$current_url": f"/p{i % 7}"})
        buyer = rng.random() < 0.5
        for k in range(rng.randrange(4)):
            add(rng.choice(["read docs", "watched demo"] if buyer else ["saw pricing", "opened chat"]), who,
                start + timedelta(minutes=5 + k))
        if rng.random() < 0.8:
            add("signed up", who, start + timedelta(minutes=30))
        if i % 5 == 0:  # identified after the fact: the anonymous person merges into the user's
            add("$identify", f"u{i}", start + timedelta(minutes=40), **{"$anon_distinct_id": who})
            who = f"u{i}"
        if buyer:
            add("purchase", who, start + timedelta(hours=rng.choice([2, 30, 100])))  # 100 h: past the window
        add("settings", who, start + timedelta(minutes=50))
    rng.shuffle(events)
    return sorted(events, key=lambda e: e["event"] == "$identify")  # identified last: two persons merge


def _project_with_history(running: Stack, seed: int) -> ProjectHandle:
    """A project with `_history`, its identifications sent after the rest is applied."""
    project = make_project(running)
    history = _history(random.Random(seed))
    identifies = [e for e in history if e["event"] == "$identify"]
    assert project.capture(history[:-len(identifies)]).status_code == 200
    running.wait_applied()
    assert project.capture(identifies).status_code == 200
    running.wait_applied()
    return project


def _correlation(api_url: str, project: ProjectHandle, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    return httpx.post(f"{api_url}/api/environments/{project.id}/insights/funnel/correlation/",
                      json={**QUERY, "refresh": "blocking"}, headers=headers, timeout=timeout)


@pytest.fixture
def other_api(running: Stack, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A second API on the same state, whose archive is off ('') or an empty directory."""
    port = stack.free_port()
    archive = request.param if request.param == "" else str(tmp_path / "empty-archive")
    api = stack.start_api(port, tmp_path, {**running.env, "INSIGHTFLOW_ARCHIVE_DIR": archive})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        api.stop()


@pytest.mark.parametrize("other_api", ["", "empty"], indirect=True, ids=["archive off", "archive without history"])
def test_event_correlation_from_the_archive_registers_nothing_and_equals_the_registered_path(
        running: Stack, other_api: str) -> None:
    project = _project_with_history(running, 11)

    archived = _correlation(running.api_url, project)
    assert archived.status_code == 200, archived.text
    assert DefinitionRegistry(running.redis).for_project(project.id) == {}  # nothing to build, nothing kept
    rows = archived.json()["result"]["events"]
    assert {r["event"]["event"] for r in rows} >= {"read docs", "saw pricing"}

    registered = _correlation(other_api, project, timeout=120)
    assert registered.status_code == 200, registered.text
    assert len(DefinitionRegistry(running.redis).for_project(project.id)) == 1  # this one built its definition
    assert registered.json()["result"] == archived.json()["result"]

    # Later events reach both at once: the archive is written before a batch is recorded applied.
    late = [{"event": "opened chat", "distinct_id": f"late{i}", "uuid": str(uuid.uuid4()),
             "timestamp": (BASE + timedelta(days=5, minutes=i)).isoformat(), "properties": {}} for i in range(40)]
    late += [{"event": "$pageview", "distinct_id": f"late{i}", "uuid": str(uuid.uuid4()),
              "timestamp": (BASE + timedelta(days=5, minutes=i - 1)).isoformat(), "properties": {}} for i in range(40)]
    assert project.capture(late).status_code == 200
    running.wait_applied()
    again = _correlation(running.api_url, project).json()["result"]
    assert again != archived.json()["result"]
    assert again == _correlation(other_api, project, timeout=120).json()["result"]


FUNNEL = {"events": QUERY["events"], "date_from": "2024-06-04", "date_to": "2024-06-12",
          "funnel_window_interval": 3, "funnel_window_interval_unit": "day"}


def _funnel(api_url: str, project: ProjectHandle, query: dict[str, Any], refresh: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    return httpx.post(f"{api_url}/api/environments/{project.id}/insights/funnel/",
                      json={**query, **({"refresh": refresh} if refresh else {})}, headers=headers, timeout=120)


def _counts(reply: httpx.Response) -> list[tuple[int, Any, Any]]:
    return [(s["count"], s["average_conversion_time"], s["median_conversion_time"]) for s in reply.json()["result"]]


@pytest.mark.parametrize("other_api", [""], indirect=True, ids=["archive off"])
def test_a_new_funnel_is_answered_from_the_archive_while_it_builds(running: Stack, other_api: str) -> None:
    """The first, non-blocking ask of a new ordered funnel answers 200 from the archive (an API
    without it answers 202 until the definition is built) and registers the funnel all the same;
    the archive's answer is the one its summaries give once built, and the other API's."""
    project = _project_with_history(running, 12)
    registry = DefinitionRegistry(running.redis)

    without = {**FUNNEL, "events": FUNNEL["events"][:2]}  # another funnel, first asked where there is no archive
    assert _funnel(other_api, project, without).status_code == 202
    assert _funnel(other_api, project, without, "blocking").status_code == 200

    first = _funnel(running.api_url, project, FUNNEL)
    assert first.status_code == 200, first.text
    assert len(registry.for_project(project.id)) == 2  # registered, built in the background
    waited = {**FUNNEL, "events": FUNNEL["events"][1:]}  # `refresh=blocking` still waits for the build
    known = set(registry.for_project(project.id))
    assert _funnel(running.api_url, project, waited, "blocking").status_code == 200
    (built,) = set(registry.for_project(project.id)) - known
    assert registry.status(project.id, built)[0] == "ready"
    deadline = datetime.now(UTC) + timedelta(seconds=60)
    while not all(registry.status(project.id, h)[0] == "ready" for h in registry.for_project(project.id)):
        assert datetime.now(UTC) < deadline
    summarised = _funnel(running.api_url, project, FUNNEL)
    assert _counts(summarised) == _counts(first) and _counts(first)[1][0] > 0
    assert _counts(_funnel(other_api, project, FUNNEL)) == _counts(first)
    timing = {**FUNNEL, "funnel_viz_type": "time_to_convert"}
    assert _funnel(other_api, project, timing).json()["result"] == _funnel(running.api_url, project,
                                                                           timing).json()["result"]


PATHS = {"include_event_types": ["$pageview", "custom_event"], "date_from": "2024-06-04", "date_to": "2024-06-12",
         "edge_limit": 1000}


def _paths(api_url: str, project: ProjectHandle, query: dict[str, Any], refresh: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    return httpx.post(f"{api_url}/api/environments/{project.id}/insights/path/",
                      json={**query, **({"refresh": refresh} if refresh else {})}, headers=headers, timeout=120)


@pytest.mark.parametrize("other_api", [""], indirect=True, ids=["archive off"])
def test_new_paths_are_answered_from_the_archive_while_they_build(running: Stack, other_api: str) -> None:
    """The first, non-blocking ask of new paths answers 200 from the archive (an API without it
    answers 202 until the definition is built) and registers them all the same; the edges equal
    those their summaries give once built, and the other API's. Sessions span merged persons (an
    anonymous person's events before the merge and the user's after) and are cut by the range."""
    project = _project_with_history(running, 13)
    registry = DefinitionRegistry(running.redis)
    pageviews = {**PATHS, "include_event_types": ["$pageview"]}  # other paths, first asked where there is no archive
    assert _paths(other_api, project, pageviews).status_code == 202

    first = _paths(running.api_url, project, PATHS)
    assert first.status_code == 200, first.text
    edges = first.json()["result"]
    assert len(edges) > 10 and any(e["target"].endswith("_settings") for e in edges)
    assert len(registry.for_project(project.id)) == 2  # registered, built in the background
    steps = {**PATHS, "step_limit": 3, "date_from": "2024-06-06"}  # the same definition, another question
    short = _paths(running.api_url, project, steps)
    assert short.status_code == 200 and short.json()["result"] != edges
    deadline = datetime.now(UTC) + timedelta(seconds=60)
    while not all(registry.status(project.id, h)[0] == "ready" for h in registry.for_project(project.id)):
        assert datetime.now(UTC) < deadline
    assert _paths(running.api_url, project, PATHS).json()["result"] == edges
    assert _paths(other_api, project, PATHS, "blocking").json()["result"] == edges
    assert _paths(other_api, project, steps, "blocking").json()["result"] == short.json()["result"]


def test_a_ready_funnel_with_a_backlog_pending_is_answered_from_the_archive(running: Stack, tmp_path: Path) -> None:
    """A ready funnel with many persons pending (a backlog applied, its persons not summarised yet) is
    answered from the archive's columns instead of the query summarising them all itself, once they
    reach `INSIGHTFLOW_ARCHIVE_BACKLOG_PERSONS` and one per 40 archived rows (`archive_quicker`). Shown
    with the summariser stopped and the persons' kept logs taken away: an API whose threshold the
    project reaches still gives the funnel's answer, from the archive; one whose threshold it does
    not reach (the default, 10,000) summarises the pending persons from their empty logs."""
    project = _project_with_history(running, 14)
    client = running.redis
    before = _funnel(running.api_url, project, FUNNEL, "blocking")
    assert before.status_code == 200, before.text
    (h,) = DefinitionRegistry(client).for_project(project.id)
    store = SummaryStore(client)
    deadline = time.monotonic() + 60
    while store.pending(project.id, h):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    port = stack.free_port()
    api = stack.start_api(port, tmp_path, {**running.env, "INSIGHTFLOW_ARCHIVE_BACKLOG_PERSONS": "1"})
    running.dataflow.stop()  # no summariser: pending persons stay pending
    try:
        dirty = keys.in_shards(keys.summary_dirty(keys.definition_prefix(project.id, h)), store.shards)
        for shard in range(store.shards):
            logs = keys.kept_logs(project.id, shard)
            found = list(client.scan_iter(match=f"{logs}*"))
            assert found
            client.sadd(dirty[shard], *[k.decode().removeprefix(logs) for k in found])
            client.delete(*found)
        assert store.pending(project.id, h) > 100
        archived = _funnel(f"http://127.0.0.1:{port}", project, FUNNEL)
        assert archived.status_code == 200, archived.text
        assert _counts(archived) == _counts(before) and _counts(before)[1][0] > 0
        summarised_here = _funnel(running.api_url, project, FUNNEL)
        assert summarised_here.status_code == 200, summarised_here.text
        assert _counts(summarised_here)[0][0] < _counts(before)[0][0]
    finally:
        api.stop()
        running.dataflow = stack.start_dataflow(running.recovery_dir, running.logs, running.env)
