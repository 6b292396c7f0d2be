"""Retention and paths validation (spec §3.2, §9.2, §10.2), monthly retention and hour periods."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import ProjectHandle, Stack


def _post(project: ProjectHandle, path: str, body: dict, now: str = "2024-04-01T00:00:00Z") -> httpx.Response:
    return httpx.post(f"{project.stack.api_url}/api/environments/{project.id}/insights/{path}",
                      json={"refresh": "blocking", **body}, timeout=60,
                      headers={"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": now})


def test_validation(project: ProjectHandle) -> None:
    for path, body, detail in (
        ("retention/", {"period": "Fortnight"}, "Period Fortnight is unsupported."),
        ("path/", {"min_edge_weight": 5, "max_edge_weight": 2}, "Max Edge weight can't be lower than min edge weight"),
        ("path/", {"include_event_types": ["custom_event"], "include_custom_events": ["a"]},
         "Cannot include all custom events and specific custom events in the same query"),
    ):
        reply = _post(project, path, body)
        assert reply.status_code == 400 and reply.json()["detail"] == detail, reply.text
    assert _post(project, "path/", {"include_event_types": ["hogql"]}).json()["code"] == "unsupported"


def test_month_and_hour_periods(project: ProjectHandle, running: Stack) -> None:
    events = [{"event": "$pageview", "distinct_id": who, "uuid": str(uuid.uuid4()), "timestamp": when}
              for who, when in (("m1", "2024-01-15T10:00:00Z"), ("m1", "2024-02-03T10:00:00Z"),
                                ("m1", "2024-03-20T10:00:00Z"), ("m2", "2024-02-10T10:00:00Z"),
                                ("m2", "2024-03-01T10:30:00Z"), ("m2", "2024-03-01T11:10:00Z"))]
    assert project.capture(events).status_code == 200
    running.wait_applied()
    monthly = _post(project, "retention/", {"period": "Month", "total_intervals": 3, "date_to": "2024-03-25"})
    rows = monthly.json()["result"]
    assert [r["date"] for r in rows] == ["2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"]
    assert [[v["count"] for v in r["values"]] for r in rows] == [[1, 1, 1], [2, 2], [2]]
    hourly = _post(project, "retention/", {"period": "Hour", "total_intervals": 2, "date_to": "2024-03-01T11:00:00"})
    assert [[v["count"] for v in r["values"]] for r in hourly.json()["result"]] == [[1, 1], [1]]
