"""Every insight endpoint, called with a key of another project or a key lacking the scope: refused,
and the body carries none of the project's data."""

from __future__ import annotations

import uuid

import httpx
import pytest

from state.registry import Registry
from tests.conftest import ProjectHandle, Stack, make_project

SECRET = "secret-event-name-7f3a"


def _endpoints(insight_id: int) -> list[tuple[str, str, dict]]:
    trend = {"events": [{"id": SECRET}], "date_from": "2024-01-01", "date_to": "2024-01-02"}
    funnel = {"events": [{"id": SECRET, "order": 0}, {"id": "b", "order": 1}]}
    return [
        ("POST", "trend/", trend), ("GET", "trend.csv", {}), ("POST", "funnel/", funnel),
        ("POST", "funnel/correlation/", funnel), ("GET", "funnel/people/", {}),
        ("POST", "retention/", {"target_entity": {"id": SECRET}}), ("GET", "retention/people/", {}),
        ("POST", "path/", {}), ("GET", "", {}), ("POST", "", {"name": "x"}), ("GET", f"{insight_id}/", {}),
        ("PATCH", f"{insight_id}/", {"name": "y"}), ("POST", f"{insight_id}/viewed/", {}),
        ("POST", "viewed/", {"insight_ids": [insight_id]}), ("GET", "my_last_viewed/", {}),
        ("POST", "timing/", {}), ("GET", f"{insight_id}/access_controls/", {}),
        ("PUT", f"{insight_id}/access_controls/", {"access_level": "none"}),
    ]


@pytest.fixture
def guarded(project: ProjectHandle, running: Stack) -> tuple[ProjectHandle, int]:
    assert project.capture([{"event": SECRET, "distinct_id": "d", "uuid": str(uuid.uuid4()),
                             "timestamp": "2024-01-01T10:00:00Z"}]).status_code == 200
    writer, _ = Registry(running.redis).create_key([project.id], ["*"])
    created = httpx.post(f"{running.api_url}/api/environments/{project.id}/insights/", timeout=30,
                         json={"name": SECRET, "filters": {"insight": "TRENDS", "events": [{"id": SECRET}]}},
                         headers={"Authorization": f"Bearer {writer}"})
    assert created.status_code == 201, created.text
    running.wait_applied()
    return project, created.json()["id"]


def test_foreign_keys_and_missing_scopes_see_nothing(guarded: tuple[ProjectHandle, int], running: Stack) -> None:
    project, insight_id = guarded
    foreign = make_project(running).key
    unscoped, _ = Registry(running.redis).create_key([project.id], ["activity_log:read"])
    foreign_reasons = (f"API key does not have access to the requested project: ID {project.id}.",
                       "API key missing required scope")  # the scope is checked first, as in PostHog
    for key, reasons in ((foreign, foreign_reasons), (unscoped, ("API key missing required scope",))):
        for method, path, body in _endpoints(insight_id):
            for prefix in ("environments", "projects"):
                reply = httpx.request(method, f"{running.api_url}/api/{prefix}/{project.id}/insights/{path}",
                                      json=body or None, headers={"Authorization": f"Bearer {key}"}, timeout=30)
                assert reply.status_code == 403, (method, path, reply.status_code, reply.text)
                assert reply.json()["detail"].startswith(reasons), (method, path, reply.text)
                assert SECRET not in reply.text or SECRET in str(body), (method, path)
