"""Personal API keys, scopes and project access on the trend endpoint (spec §2, §3)."""

from __future__ import annotations

import httpx

from state.registry import Registry
from tests.conftest import ProjectHandle, Stack, make_project

QUERY = {"events": [{"id": "$pageview"}]}


def test_missing_and_invalid_keys(project: ProjectHandle, running: Stack) -> None:
    url = f"{running.api_url}/api/environments/{project.id}/insights/trend/"
    none = httpx.post(url, json=QUERY)
    assert none.status_code == 403
    assert none.json() == {"type": "authentication_error", "code": "not_authenticated",
                           "detail": "Authentication credentials were not provided.", "attr": None}
    bad = httpx.post(url, json=QUERY, headers={"Authorization": "Bearer phx_wrong"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    assert bad.json()["detail"] == "Personal API key found in request Authorization header is invalid."
    query_string = httpx.post(url + "?personal_api_key=phx_wrong", json=QUERY)
    assert query_string.json()["detail"] == "Personal API key found in request query string is invalid."


def test_scopes_and_projects(project: ProjectHandle, running: Stack) -> None:
    registry = Registry(running.redis)
    write_only, _ = registry.create_key([project.id], ["insight:write"])
    assert project.trend(QUERY, key=write_only).status_code == 200  # write implies read
    other_scope, _ = registry.create_key([project.id], ["activity_log:read"])
    denied = project.trend(QUERY, key=other_scope)
    assert denied.status_code == 403
    assert denied.json()["detail"] == "API key missing required scope 'insight:read'"
    other = make_project(running)
    cross = project.trend(QUERY, key=other.key)
    assert cross.status_code == 403
    assert cross.json()["detail"] == f"API key does not have access to the requested project: ID {project.id}."


def test_unknown_project_and_route(project: ProjectHandle, running: Stack) -> None:
    registry = Registry(running.redis)
    key, _ = registry.create_key([], ["*"])  # unrestricted key
    missing = httpx.post(f"{running.api_url}/api/environments/987654/insights/trend/", json=QUERY,
                         headers={"Authorization": f"Bearer {key}"})
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    nowhere = httpx.get(f"{running.api_url}/api/environments/1/insights/nothing/")
    assert nowhere.status_code == 404 and nowhere.json()["type"] == "invalid_request"


def test_request_errors(project: ProjectHandle) -> None:
    cases = [
        ({"events": [{"id": "$pageview", "math": "nonsense"}]}, "events__0__math", "Unknown math"),
        ({"events": [{"id": "$pageview"}], "date_from": "not-a-date-zz"}, "date_from", "parse"),
        ({"events": [{"id": "$pageview"}], "interval": "fortnight"}, "interval", "Unknown interval"),
        ({}, "events", "At least one"),
    ]
    for query, attr, needle in cases:
        reply = project.trend(query)
        assert reply.status_code == 400, (query, reply.text)
        body = reply.json()
        assert body["type"] == "validation_error" and body["attr"] == attr and needle in body["detail"], body
    garbled = project.trend({"events": "[{not json"}, method="GET")
    assert garbled.status_code == 400 and garbled.json()["attr"] == "events"
    body = httpx.post(f"{project.stack.api_url}/api/environments/{project.id}/insights/trend/", content=b"{oops",
                      headers={"Authorization": f"Bearer {project.key}"})
    assert body.status_code == 400 and body.json()["code"] == "parse_error"


def test_rate_limit_per_key(project: ProjectHandle, running: Stack, tmp_path) -> None:
    from serving import stack as stack_mod

    port = stack_mod.free_port()
    api = stack_mod.start_api(port, tmp_path, {**running.env, "INSIGHTFLOW_RATE_LIMIT": "3"})
    try:
        url = f"http://127.0.0.1:{port}/api/environments/{project.id}/insights/trend/"
        other = make_project(running)
        codes = [httpx.post(url, json=QUERY, headers={"Authorization": f"Bearer {project.key}"}).status_code
                 for _ in range(5)]
        assert (codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]) or 429 in codes[1:]
        limited = httpx.post(url, json=QUERY, headers={"Authorization": f"Bearer {project.key}"})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        body = limited.json()
        assert body["type"] == "throttled_error" and body["code"] == "throttled"
        assert body["detail"].startswith("Request was throttled. Expected available in ")
        other_url = f"http://127.0.0.1:{port}/api/environments/{other.id}/insights/trend/"
        assert httpx.post(other_url, json=QUERY, headers={"Authorization": f"Bearer {other.key}"}).status_code == 200
    finally:
        api.stop()


def test_openapi_lists_every_endpoint(running: Stack) -> None:
    spec = httpx.get(f"{running.api_url}/openapi.json").json()
    paths = set(spec["paths"])
    for suffix in ("trend/", "funnel/", "funnel/correlation/", "funnel/people/", "retention/", "retention/people/",
                   "path/", "", "my_last_viewed/", "timing/", "viewed/", "{insight_id}/", "{insight_id}/viewed/",
                   "{insight_id}/access_controls/"):
        assert f"/api/environments/{{project_id}}/insights/{suffix}" in paths, suffix
    for path in ("/batch/", "/readyz", "/healthz", "/metrics"):
        assert path in paths, path
    assert httpx.get(f"{running.api_url}/docs").status_code == 200
