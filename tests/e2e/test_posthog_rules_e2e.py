"""PostHog's rules where our numbers used to differ (issue 12), each on a scenario of its own, end to end."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import ProjectHandle, Stack

NOW = "2024-03-10T12:00:00Z"


def _event(name: str, who: str, when: str, **props: Any) -> dict[str, Any]:
    return {"event": name, "distinct_id": who, "timestamp": when, "uuid": str(uuid.uuid4()), "properties": props}


def _capture(project: ProjectHandle, running: Stack, events: list[dict[str, Any]]) -> None:
    assert project.capture(events).status_code == 200
    running.wait_applied()


def _funnel(project: ProjectHandle, query: dict[str, Any]) -> list[Any]:
    reply = httpx.post(f"{project.stack.api_url}/api/environments/{project.id}/insights/funnel/",
                       json={**query, "refresh": "blocking"}, timeout=60,
                       headers={"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW})
    assert reply.status_code == 200, reply.text
    return list(reply.json()["result"])


def test_tied_breakdown_values_kept_by_value_descending(project: ProjectHandle, running: Stack) -> None:
    """Three plans tie at 2 events: the limit keeps the largest values (ties by value, descending),
    shown by value ascending, the rest in Other."""
    events = [_event("paid", f"p{plan}{i}", "2024-03-05T10:00:00Z", plan=plan) for plan in "abc" for i in range(2)]
    events += [_event("paid", "z1", "2024-03-05T11:00:00Z", plan="d") for _ in range(3)]
    _capture(project, running, events)
    query = {"events": [{"id": "paid"}], "breakdown": "plan", "breakdown_limit": 3, "date_from": "2024-03-05",
             "date_to": "2024-03-05", "refresh": "blocking"}
    result = project.trend(query, now=NOW).json()["result"]
    assert [(r["breakdown_value"], r["count"]) for r in result] == [
        ("d", 3), ("b", 2), ("c", 2), ("$$_posthog_breakdown_other_$$", 2)]
    dau = project.trend({**query, "events": [{"id": "paid", "math": "dau"}]}, now=NOW).json()["result"]
    assert [r["breakdown_value"] for r in dau] == ["a", "b", "c", "$$_posthog_breakdown_other_$$"]  # d: 1 person


def test_formula_rows_are_the_union_of_every_series_values(project: ProjectHandle, running: Stack) -> None:
    """A value only series B has still gets a row, A's side counting 0; the null value comes last."""
    events = [_event("viewed", "u1", "2024-03-05T10:00:00Z", src="ads"),
              _event("viewed", "u2", "2024-03-05T10:00:00Z", src="mail"),
              _event("viewed", "u3", "2024-03-05T10:00:00Z"),
              _event("bought", "u1", "2024-03-05T11:00:00Z", src="mail"),
              _event("bought", "u2", "2024-03-05T11:00:00Z", src="organic"),
              _event("bought", "u3", "2024-03-05T11:00:00Z", src="organic"),
              _event("bought", "u4", "2024-03-05T11:00:00Z", src="organic")]
    _capture(project, running, events)
    query = {"events": [{"id": "viewed", "order": 0}, {"id": "bought", "order": 1}], "formula": "A+B",
             "breakdown": "src", "date_from": "2024-03-05", "date_to": "2024-03-05", "refresh": "blocking"}
    result = project.trend(query, now=NOW).json()["result"]
    assert [(r["breakdown_value"], r["data"]) for r in result] == [
        ("organic", [3]), ("mail", [2]), ("ads", [1]), ("$$_posthog_breakdown_null_$$", [1])]


def test_funnel_breakdowns_ranked_by_the_last_step(project: ProjectHandle, running: Stack) -> None:
    """Counts per browser: Edge (3, 1, 0), Firefox (2, 2, 1), Opera (1, 1, 1). By the last step's count
    (then entrants): Firefox, Opera, Edge; the old step-1 order would put Edge first."""
    journeys = {"Edge": [3, 1, 0], "Firefox": [2, 2, 1], "Opera": [1, 1, 1]}
    events = []
    for browser, counts in journeys.items():
        for person in range(counts[0]):
            who = f"{browser}-{person}"
            reached = sum(1 for c in counts if c > person)
            for step, name in enumerate(["land", "signup", "pay"][:reached]):
                events.append(_event(name, who, f"2024-03-05T1{step}:00:00Z", **{"$browser": browser}))
    _capture(project, running, events)
    query = {"events": [{"id": n, "order": i} for i, n in enumerate(["land", "signup", "pay"])],
             "breakdown": "$browser", "date_from": "2024-03-01", "date_to": "2024-03-08"}
    for order in ("ordered", "unordered", "strict"):
        steps = _funnel(project, {**query, "funnel_order_type": order})
        assert [(g[0]["breakdown_value"], [s["count"] for s in g]) for g in steps] == [
            (["Firefox"], [2, 2, 1]), (["Opera"], [1, 1, 1]), (["Edge"], [3, 1, 0])], order
    limited = _funnel(project, {**query, "breakdown_limit": 1})
    assert [g[0]["breakdown_value"] for g in limited] == [["Firefox"], ["Other"]]

    # Funnel trends broken down: one series per value, in the same order, each with its own counts.
    trends = _funnel(project, {**query, "funnel_viz_type": "trends", "date_from": "2024-03-04",
                               "date_to": "2024-03-06"})
    assert [(t["breakdown_value"], t["reached_from_step_count"], t["reached_to_step_count"], t["data"])
            for t in trends] == [
        (["Firefox"], [0, 2, 0], [0, 1, 0], [0, 50.0, 0]),
        (["Opera"], [0, 1, 0], [0, 1, 0], [0, 100.0, 0]),
        (["Edge"], [0, 3, 0], [0, 0, 0], [0, 0.0, 0])]
    assert all(t["days"] == ["2024-03-04", "2024-03-05", "2024-03-06"] for t in trends)


def test_a_start_with_a_time_of_day_counts_from_that_hour(project: ProjectHandle, running: Stack) -> None:
    """`date_from: -24h` on a daily trend: the first day holds only its hours inside the range."""
    events = [_event("ping", "early", "2024-03-09T02:00:00Z"), _event("ping", "late", "2024-03-09T20:00:00Z"),
              _event("ping", "late", "2024-03-10T09:00:00Z")]
    _capture(project, running, events)
    for math, first in (("total", 1), ("dau", 1)):
        result = project.trend({"events": [{"id": "ping", "math": math}], "date_from": "-24h", "interval": "day"},
                               now=NOW).json()["result"][0]
        assert result["days"] == ["2024-03-09", "2024-03-10"] and result["data"] == [first, 1], (math, result)
        assert result["count"] == 2
    whole = project.trend({"events": [{"id": "ping"}], "date_from": "-1d", "interval": "day"}, now=NOW).json()
    assert whole["result"][0]["data"] == [2, 1]  # a relative day starts at midnight: the whole day counts
    exact = project.trend({"events": [{"id": "ping"}], "date_from": "2024-03-09T12:30:00Z", "date_to": "2024-03-10",
                           "interval": "day"}, now=NOW).json()
    assert exact["result"][0]["data"] == [1, 1]


def test_dates_as_people_type_them(project: ProjectHandle, running: Stack) -> None:
    _capture(project, running, [_event("typed", "t", "2024-03-05T10:00:00Z")])
    for date in ("2024-3-05", "2024-03-5", "2024-3-5"):
        reply = project.trend({"events": [{"id": "typed"}], "date_from": date, "date_to": date}, now=NOW)
        assert reply.status_code == 200 and reply.json()["result"][0]["data"] == [1], (date, reply.text)
    refused = project.trend({"events": [{"id": "typed"}], "date_from": "2024-3-5x"}, now=NOW)
    assert refused.status_code == 400 and "use YYYY-MM-DD" in refused.json()["detail"]
    assert refused.json()["attr"] == "date_from"
