"""Funnel validation (§7.5, §7.12, §8.2), the people endpoint, and correlation options."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import ProjectHandle, Stack

NOW = "2024-05-20T00:00:00Z"
STEPS = [{"id": "a", "order": 0}, {"id": "b", "order": 1}, {"id": "c", "order": 2}]


def _post(project: ProjectHandle, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{project.stack.api_url}/api/environments/{project.id}/insights/{path}",
                      json={"refresh": "blocking", **body}, timeout=60,
                      headers={"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW})


def test_validation_messages(project: ProjectHandle) -> None:
    cases = [
        ({"events": STEPS[:1]}, "Funnels require at least two steps."),
        ({"events": STEPS, "exclusions": [{"id": "x", "funnel_from_step": 1, "funnel_to_step": 1}]},
         "Exclusion event range is invalid. End of range should be greater than start."),
        ({"events": STEPS, "exclusions": [{"id": "x", "funnel_from_step": 2, "funnel_to_step": 3}]},
         "Exclusion event range is invalid. Start of range is greater than number of steps."),
        ({"events": STEPS, "exclusions": [{"id": "x", "funnel_from_step": 0, "funnel_to_step": 3}]},
         "Exclusion event range is invalid. End of range is greater than number of steps."),
        ({"events": STEPS, "exclusions": [{"id": "b", "funnel_from_step": 0, "funnel_to_step": 2}]},
         "Exclusion steps cannot contain an event that's part of funnel steps."),
        ({"events": STEPS, "funnel_order_type": "unordered",
          "exclusions": [{"id": "x", "funnel_from_step": 0, "funnel_to_step": 1}]},
         "Partial Exclusions not allowed in unordered funnels"),
        ({"events": STEPS, "funnel_viz_type": "time_to_convert", "funnel_to_step": 5},
         "Filter parameter funnel_to_step can only be one of 1, 2 for time to convert!"),
        ({"events": STEPS, "breakdown_attribution_type": "step", "breakdown": "$browser"},
         "breakdown_attribution_value is required with step attribution."),
    ]
    for body, detail in cases:
        reply = _post(project, "funnel/", body)
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["type"] == "validation_error" and reply.json()["detail"] == detail, reply.json()
    for body, detail in (
        ({"events": STEPS, "funnel_correlation_type": "properties"},
         "Property Correlation expects atleast one Property to run correlation on"),
        ({"events": STEPS, "funnel_correlation_type": "event_with_properties"},
         "Event Property Correlation expects atleast one event name to run correlation on"),
    ):
        reply = _post(project, "funnel/correlation/", body)
        assert reply.status_code == 400 and reply.json()["detail"] == detail


def test_people_pagination_and_correlation(project: ProjectHandle, running: Stack) -> None:
    events = []
    for i in range(30):
        who = f"p{i}"
        events.append({"event": "a", "distinct_id": who, "timestamp": "2024-05-10T10:00:00Z",
                       "uuid": str(uuid.uuid4()), "properties": {"plan": "pro" if i % 2 else "free",
                                                                 "$set": {"tier": "gold" if i < 20 else "tin"}}})
        if i < 20:
            events.append({"event": "b", "distinct_id": who, "timestamp": "2024-05-10T11:00:00Z",
                           "uuid": str(uuid.uuid4()), "properties": {}})
        events.append({"event": "helped" if i < 20 else "lost", "distinct_id": who, "uuid": str(uuid.uuid4()),
                       "timestamp": "2024-05-10T10:30:00Z", "properties": {"source": "docs" if i < 20 else "ads"}})
    assert project.capture(events).status_code == 200
    running.wait_applied()
    query = {"events": STEPS[:2], "date_from": "2024-05-10", "date_to": "2024-05-11"}
    steps = _post(project, "funnel/", query).json()["result"]
    assert [s["count"] for s in steps] == [30, 20]
    assert steps[1]["average_conversion_time"] == 3600
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    page = httpx.get(steps[0]["converted_people_url"] + "&limit=25", headers=headers).json()
    assert page["results"][0]["count"] == 30 and len(page["results"][0]["people"]) == 25
    rest = httpx.get(page["next"], headers=headers).json()
    assert len(rest["results"][0]["people"]) == 5 and rest["next"] is None
    dropped = httpx.get(steps[1]["dropped_people_url"], headers=headers).json()["results"][0]["people"]
    assert sorted(p["distinct_ids"][0] for p in dropped) == sorted(f"p{i}" for i in range(20, 30))

    by_event = _post(project, "funnel/correlation/", query).json()["result"]
    assert [(r["event"]["event"], r["correlation_type"]) for r in by_event["events"]] == [
        ("helped", "success"), ("lost", "failure")]
    assert by_event["skewed"] is False
    excluded = _post(project, "funnel/correlation/", {**query, "funnel_correlation_exclude_event_names": ["helped"]})
    assert [r["event"]["event"] for r in excluded.json()["result"]["events"]] == ["lost"]
    props = _post(project, "funnel/correlation/", {**query, "funnel_correlation_type": "properties",
                                                    "funnel_correlation_names": ["tier"]}).json()["result"]
    assert [(r["event"]["event"], r["success_count"], r["failure_count"]) for r in props["events"]] == [
        ("tier::gold", 20, 0), ("tier::tin", 0, 10)]
    with_props = _post(project, "funnel/correlation/", {**query, "funnel_correlation_type": "event_with_properties",
                                                         "funnel_correlation_event_names": ["helped", "lost"]})
    rows = [(r["event"]["event"], r["odds_ratio"] > 1) for r in with_props.json()["result"]["events"]]
    assert rows == [("helped::source::docs", True), ("lost::source::ads", False)]
