"""Saved insights CRUD (§14), views and my_last_viewed (§12), timing (§11), scopes and isolation."""

from __future__ import annotations

import uuid

import httpx

from state.registry import Registry
from tests.conftest import ProjectHandle, Stack, make_project

NOW = "2024-06-10T12:00:00Z"


def _client(project: ProjectHandle, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=f"{project.stack.api_url}/api/environments/{project.id}/insights", timeout=60,
                        headers={"Authorization": f"Bearer {key or project.key}", "X-Insightflow-Now": NOW})


def _writer(project: ProjectHandle, running: Stack) -> str:
    key, _ = Registry(running.redis).create_key([project.id], ["insight:write"])
    return key


def test_crud_round_trip_with_live_result(project: ProjectHandle, running: Stack) -> None:
    events = [{"event": "ordered", "distinct_id": f"s{i}", "uuid": str(uuid.uuid4()),
               "timestamp": "2024-06-09T10:00:00Z", "properties": {"plan": "pro" if i % 2 else "free"}}
              for i in range(6)]
    assert project.capture(events).status_code == 200
    running.wait_applied()
    with _client(project, _writer(project, running)) as api:
        filters = {"insight": "TRENDS", "events": [{"id": "ordered"}], "breakdown": "plan",
                   "date_from": "2024-06-09", "date_to": "2024-06-09"}
        created = api.post("/", json={"name": "Orders by plan", "filters": filters, "tags": [" Sales ", "sales", "KPI"],
                                      "description": "daily"})
        assert created.status_code == 201, created.text
        body = created.json()
        assert len(body["short_id"]) == 8 and body["saved"] is True and body["deleted"] is False
        assert body["tags"] == ["sales", "kpi"] and body["created_by"]["distinct_id"]
        insight_id = body["id"]
        fetched = api.get(f"/{insight_id}/", params={"refresh": "blocking"}).json()
        assert {r["breakdown_value"]: r["data"] for r in fetched["result"]} == {"pro": [3], "free": [3]}
        assert fetched["timezone"] == "UTC" and fetched["last_refresh"] is not None
        # The result stays live: a new event is reflected without re-saving.
        assert project.capture([{**events[0], "uuid": str(uuid.uuid4())}]).status_code == 200
        running.wait_applied()
        again = api.get(f"/{insight_id}/", params={"refresh": "blocking"}).json()
        assert {r["breakdown_value"]: r["data"] for r in again["result"]} == {"pro": [3], "free": [4]}

        renamed = api.patch(f"/{insight_id}/", json={"name": "Orders", "favorited": True}).json()
        assert renamed["name"] == "Orders" and renamed["favorited"] is True
        assert renamed["last_modified_at"] >= body["last_modified_at"]
        assert api.get("/", params={"favorited": "true"}).json()["count"] == 1
        assert api.get("/", params={"short_id": body["short_id"]}).json()["results"][0]["id"] == insight_id
        assert api.get("/", params={"search": "ORDERS"}).json()["count"] == 1
        assert api.delete(f"/{insight_id}/").status_code == 405
        assert api.patch(f"/{insight_id}/", json={"deleted": True}).json()["deleted"] is True
        assert api.get("/").json()["count"] == 0
        assert api.get(f"/{insight_id}/").status_code == 404  # gone, as PostHog answers
        assert api.patch(f"/{insight_id}/", json={"name": "back?"}).status_code == 404
        assert api.patch(f"/{insight_id}/", json={"deleted": False}).status_code == 200  # restored
        assert api.get(f"/{insight_id}/").json()["name"] == "Orders"
        for bad, attr in (({"name": "x" * 401}, "name"), ({"query": "nope"}, "query"),
                          ({"dashboards": [5]}, "dashboards"), ({"tags": "a"}, "tags"),
                          ({"filters": {"insight": "TRENDS", "events": [{"id": "a", "math": "nope"}]}},
                           "filters__events__0__math")):
            reply = api.post("/", json=bad)
            assert reply.status_code == 400 and reply.json()["attr"] == attr, (bad, reply.text)
        assert api.get("/999999/").status_code == 404


def test_pagination_views_and_timing(project: ProjectHandle, running: Stack) -> None:
    with _client(project, _writer(project, running)) as api:
        ids = [api.post("/", json={"name": f"n{i}", "saved": i % 2 == 0}).json()["id"] for i in range(7)]
        page = api.get("/", params={"limit": 3}).json()
        assert page["count"] == 7 and len(page["results"]) == 3 and page["previous"] is None
        second = httpx.get(page["next"], headers=api.headers).json()
        assert len(second["results"]) == 3 and second["previous"]
        assert api.get("/", params={"saved": "false"}).json()["count"] == 3
        assert api.post(f"/{ids[0]}/viewed/").status_code == 201
        assert api.post("/viewed/", json={"insight_ids": [ids[3], ids[1]]}).status_code == 201
        last = api.get("/my_last_viewed/").json()
        assert isinstance(last, list) and len(last) == 5
        assert [i["id"] for i in last][:3] == [ids[1], ids[3], ids[0]] or [i["id"] for i in last][:3] == [
            ids[3], ids[1], ids[0]]
        assert set(last[0]) >= {"id", "short_id", "name", "last_viewed_at", "favorited", "tags"}
        assert api.post("/timing/", json={"type": "insight_load", "time_to_see_data_ms": 12}).status_code == 201
        assert api.post("/timing/", json={"type": "insight_load"}).content == b""


def test_scopes_and_isolation(project: ProjectHandle, running: Stack) -> None:
    with _client(project, _writer(project, running)) as api:
        insight_id = api.post("/", json={"name": "private"}).json()["id"]
    with _client(project) as reader:  # insight:read only
        assert reader.get(f"/{insight_id}/").status_code == 200
        denied = reader.post("/", json={"name": "x"})
        assert denied.status_code == 403 and denied.json()["detail"] == "API key missing required scope 'insight:write'"
        assert reader.patch(f"/{insight_id}/", json={"name": "y"}).status_code == 403
    other = make_project(running)
    with _client(project, other.key) as intruder:
        for method, path in (("GET", "/"), ("GET", f"/{insight_id}/"), ("GET", "/my_last_viewed/"),
                             ("POST", "/viewed/"), ("POST", "/timing/")):
            reply = intruder.request(method, path, json={"insight_ids": [insight_id]})
            assert reply.status_code == 403, (method, path, reply.text)
            assert "private" not in reply.text


def test_access_controls(project: ProjectHandle, running: Stack) -> None:
    registry = Registry(running.redis)
    creator = _writer(project, running)
    other_writer, _ = registry.create_key([project.id], ["insight:write", "access_control:read",
                                                          "access_control:write"])
    admin, _ = registry.create_key([project.id], ["*"])
    with _client(project, creator) as api:
        insight_id = api.post("/", json={"name": "guarded"}).json()["id"]
    with _client(project, other_writer) as other:
        member = other.get(f"/{insight_id}/").json()["created_by"]  # the creator, not this key
        assert member["uuid"]
        acl = other.get(f"/{insight_id}/access_controls/").json()
        assert acl["user_access_level"] == "editor" and acl["user_can_edit_access_levels"] is False
        refused = other.put(f"/{insight_id}/access_controls/", json={"access_level": "none"})
        assert refused.status_code == 403
        assert refused.json()["detail"] == "Must be manager to modify insight permissions."
    with _client(project, admin) as boss:
        bad = boss.put(f"/{insight_id}/access_controls/", json={"access_level": "owner"})
        assert bad.status_code == 400
        assert bad.json()["detail"] == "Invalid access level. Must be one of: none, viewer, editor, manager"
        both = boss.put(f"/{insight_id}/access_controls/", json={"access_level": "viewer", "organization_member": "a",
                                                                 "role": "b"})
        assert both.json()["detail"] == "You can not scope an access control to both a member and a role."
        entry = boss.put(f"/{insight_id}/access_controls/", json={"access_level": "viewer"})
        assert entry.status_code == 200 and entry.json()["resource_id"] == str(insight_id)
    with _client(project, other_writer) as other:
        assert other.get(f"/{insight_id}/").json()["user_access_level"] == "viewer"
        denied = other.patch(f"/{insight_id}/", json={"name": "mine"})
        assert denied.status_code == 403
        assert denied.json()["detail"] == "You do not have editor access to this resource."
    with _client(project, admin) as boss:
        assert boss.put(f"/{insight_id}/access_controls/", json={"access_level": "none"}).status_code == 200
    with _client(project, other_writer) as other:
        assert other.get(f"/{insight_id}/").status_code == 404
        assert insight_id not in [i["id"] for i in other.get("/").json()["results"]]
    with _client(project, creator) as api:  # the creator always manages its insight
        assert api.get(f"/{insight_id}/").json()["user_access_level"] == "manager"
    with _client(project, admin) as boss:
        assert boss.put(f"/{insight_id}/access_controls/", json={"access_level": None}).status_code == 204
    with _client(project, other_writer) as other:
        assert other.get(f"/{insight_id}/").status_code == 200


def test_saved_funnel_result_stays_live(running: Stack) -> None:
    """A saved ordered funnel is answered from attempt summaries, and a conversion after saving shows."""
    project = make_project(running)
    steps = [("visit", "2024-06-09T10:00:00Z"), ("buy", "2024-06-09T10:05:00Z")]
    events = [{"event": name, "distinct_id": f"f{i}", "uuid": str(uuid.uuid4()), "timestamp": ts}
              for i in range(4) for name, ts in steps[: 1 + (i % 2)]]
    assert project.capture(events).status_code == 200
    running.wait_applied()
    with _client(project, _writer(project, running)) as api:
        filters = {"insight": "FUNNELS", "events": [{"id": "visit", "order": 0}, {"id": "buy", "order": 1}],
                   "date_from": "2024-06-09", "date_to": "2024-06-09"}
        created = api.post("/", json={"name": "Checkout", "filters": filters})
        assert created.status_code == 201, created.text
        insight_id = created.json()["id"]
        fetched = api.get(f"/{insight_id}/", params={"refresh": "blocking"}).json()
        assert [s["count"] for s in fetched["result"]] == [4, 2]
        assert fetched["result"][1]["average_conversion_time"] == 300
        late = {"event": "buy", "distinct_id": "f0", "uuid": str(uuid.uuid4()), "timestamp": "2024-06-09T10:10:00Z"}
        assert project.capture([late]).status_code == 200
        running.wait_applied()
        again = api.get(f"/{insight_id}/", params={"refresh": "blocking"}).json()
        assert [s["count"] for s in again["result"]] == [4, 3]
        assert again["result"][1]["average_conversion_time"] == 400  # (300 + 300 + 600) / 3


def test_a_refused_write_changes_nothing(project: ProjectHandle, running: Stack) -> None:
    """Every check runs before the write: a 400 leaves the list, my_last_viewed and the insight as they were."""
    with _client(project, _writer(project, running)) as api:
        good = {"insight": "TRENDS", "events": [{"id": "kept"}], "date_from": "2024-06-01", "date_to": "2024-06-09"}
        insight = api.post("/", json={"name": "Kept", "filters": good}).json()
        before = api.get(f"/{insight['id']}/").json()
        for bad, attr in (({"insight": "TRENDS", "events": [{"id": "a", "math": "nope"}]}, "filters__events__0__math"),
                          ({"insight": "TRENDS", "events": "x"}, "filters__events"),
                          ({"insight": "LIFECYCLE", "events": [{"id": "a"}]}, "filters__insight"),
                          ({"insight": "TRENDS", "events": [{"id": "a"}], "date_to": "2024-13-45"},
                           "filters__date_to")):
            created = api.post("/", json={"name": "Refused", "filters": bad})
            assert created.status_code == 400 and created.json()["attr"] == attr, (bad, created.text)
            patched = api.patch(f"/{insight['id']}/", json={"filters": bad, "name": "Changed?"})
            assert patched.status_code == 400 and patched.json()["attr"] == attr, (bad, patched.text)
        assert api.get("/").json()["count"] == 1
        for limit, offset in ((0, 0), (-5, 0), (10, -1), ("x", 0)):
            page = api.get("/", params={"limit": limit, "offset": offset})
            assert page.status_code == 400 and page.json()["attr"] in ("limit", "offset"), page.text
        assert [i["id"] for i in api.get("/my_last_viewed/").json()] == [insight["id"]]
        after = api.get(f"/{insight['id']}/").json()
        assert after["name"] == "Kept" and after["filters"] == good
        assert after["result"] == before["result"] and after["result"] is not None
