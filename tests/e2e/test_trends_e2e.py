"""Trend options beyond the conformance cases: first-time users, formulas, compare, CSV, cumulative."""

from __future__ import annotations

import csv
import io
import uuid

import httpx

from tests.conftest import ProjectHandle, Stack

NOW = "2024-03-10T12:00:00Z"


def _event(name: str, who: str, when: str) -> dict:
    return {"event": name, "distinct_id": who, "timestamp": when, "uuid": str(uuid.uuid4())}


def test_first_time_for_user_follows_late_events(project: ProjectHandle, running: Stack) -> None:
    events = [_event("signed up", "a", "2024-03-05T10:00:00Z"), _event("signed up", "a", "2024-03-06T10:00:00Z"),
              _event("signed up", "b", "2024-03-06T11:00:00Z"), _event("signed up", "c", "2024-03-07T11:00:00Z")]
    assert project.capture(events).status_code == 200
    running.wait_applied()
    query = {"events": [{"id": "signed up", "math": "first_time_for_user"}], "date_from": "2024-03-04",
             "date_to": "2024-03-08"}
    assert project.trend(query, now=NOW).json()["result"][0]["data"] == [0, 1, 1, 1, 0]
    # A late event moves c's first time earlier: its count moves from the 7th to the 4th.
    assert project.capture([_event("signed up", "c", "2024-03-04T09:00:00Z")]).status_code == 200
    running.wait_applied()
    assert project.trend(query, now=NOW).json()["result"][0]["data"] == [1, 1, 1, 0, 0]
    hourly = project.trend({**query, "interval": "hour", "date_from": "2024-03-06T10:00:00Z",
                            "date_to": "2024-03-06T11:00:00Z"}, now=NOW).json()["result"][0]["data"]
    assert hourly == [0, 1]


def test_formula_compare_cumulative_and_csv(project: ProjectHandle, running: Stack) -> None:
    events = ([_event("view", f"v{i}", "2024-03-08T10:00:00Z") for i in range(4)]
              + [_event("buy", "v1", "2024-03-08T11:00:00Z"), _event("view", "v1", "2024-03-02T10:00:00Z")])
    assert project.capture(events).status_code == 200
    running.wait_applied()
    base = {"events": [{"id": "buy"}, {"id": "view", "math": "dau", "custom_name": "Viewers"}],
            "date_from": "-2d", "interval": "day"}
    ratio = project.trend({**base, "formula": "A / B * 100"}, now=NOW).json()["result"]
    assert len(ratio) == 1 and ratio[0]["label"] == "Formula (A / B * 100)" and ratio[0]["action"] is None
    assert ratio[0]["data"] == [25.0, 0.0, 0.0]  # 0/0 is 0, not an error

    compared = project.trend({**base, "compare": True, "date_from": "-7d"}, now=NOW).json()["result"]
    assert [(r["label"], r["compare_label"]) for r in compared] == [
        ("buy", "current"), ("buy", "previous"), ("view", "current"), ("view", "previous")]
    assert compared[2]["days"][0] == "2024-03-03" and compared[3]["days"][0] == "2024-02-25"
    assert sum(compared[3]["data"]) == 1  # v1's view on 2 March is in the previous week

    cumulative = project.trend({**base, "display": "ActionsLineGraphCumulative", "date_from": "-9d"},
                               now=NOW).json()["result"][1]
    assert cumulative["data"][-1] == 4 and cumulative["count"] == 5.0  # v1 counted once cumulatively

    url = f"{running.api_url}/api/environments/{project.id}/insights/trend.csv"
    reply = httpx.get(url, params={"events": '[{"id": "buy"}, {"id": "view", "custom_name": "Viewers"}]',
                                   "date_from": "2024-03-07", "date_to": "2024-03-08", "export_name": "My Views"},
                      headers={"Authorization": f"Bearer {project.key}"})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/csv")
    assert reply.headers["content-disposition"] == (
        'attachment; filename="my-views (2024-03-07 - 2024-03-08) from PostHog.csv"')
    assert reply.text.split("\r\n")[0] == "series,7-Mar-2024,8-Mar-2024"
    rows = list(csv.reader(io.StringIO(reply.text)))
    assert rows[1:] == [["buy", "0", "1"], ["Viewers", "0", "4"]]
    same = project.trend({"events": [{"id": "buy"}], "date_from": "2024-03-08", "date_to": "2024-03-08",
                          "format": "csv"}, now=NOW)
    assert same.text == "series,8-Mar-2024\r\nbuy,1\r\n"


def test_formula_errors(project: ProjectHandle) -> None:
    reply = project.trend({"events": [{"id": "a"}, {"id": "b"}], "formula": "A + C"})
    assert reply.status_code == 400 and reply.json()["attr"] == "formula"
    assert "series C" in reply.json()["detail"]
    assert project.trend({"events": [{"id": "a"}], "formula": "A +"}).status_code == 400


def test_next_link_smoothing_world_map_and_unsupported(project: ProjectHandle, running: Stack) -> None:
    events = [{**_event("visit", f"w{i}", f"2024-03-0{1 + i % 4}T10:00:00Z"),
               "properties": {"$geoip_country_code": ["US", "DE", "FR"][i % 3], "$browser": f"b{i % 4}"}}
              for i in range(12)]
    assert project.capture(events).status_code == 200
    running.wait_applied()
    url = f"{running.api_url}/api/environments/{project.id}/insights/trend/"
    headers = {"Authorization": f"Bearer {project.key}", "X-Insightflow-Now": NOW}
    params = {"events": '[{"id": "visit"}]', "breakdown": "$browser", "breakdown_limit": "2",
              "date_from": "2024-03-01", "date_to": "2024-03-04", "refresh": "blocking"}
    first = httpx.get(url, params=params, headers=headers).json()
    assert len(first["result"]) == 3  # two kept values and the other bucket
    assert first["next"] == str(httpx.URL(url, params=params)) + "&offset=2"
    paged = httpx.get(url, params={**params, "offset": "2"}, headers=headers).json()
    assert paged["next"].startswith("api/environments/") and "offset=4" in paged["next"]
    few = httpx.get(url, params={**params, "breakdown_limit": "10"}, headers=headers).json()
    assert few["next"] is None

    smooth = project.trend({"events": [{"id": "visit"}], "date_from": "2024-03-01", "date_to": "2024-03-04",
                            "smoothing_intervals": 2}, now=NOW).json()["result"][0]
    assert smooth["data"] == [3, 3, 3, 3]  # floor of the mean of the last two days

    world = project.trend({"events": [{"id": "visit", "math": "dau"}], "display": "WorldMap",
                           "date_from": "2024-03-01", "date_to": "2024-03-04", "refresh": "blocking"}, now=NOW)
    assert world.status_code == 200, world.text
    assert {r["breakdown_value"]: r["aggregated_value"] for r in world.json()["result"]} == {"US": 4, "DE": 4, "FR": 4}

    action = {"id": 7, "name": "Engaged", "steps": [
        {"event": "visit", "properties": [{"key": "$browser", "value": "b1"}]},
        {"event": "visit", "properties": [{"key": "$geoip_country_code", "value": "FR"}]}]}
    engaged = project.trend({"actions": [action], "events": [{"id": "visit", "order": 1}], "date_from": "2024-03-01",
                             "date_to": "2024-03-04", "refresh": "blocking"}, now=NOW)
    assert engaged.status_code == 200, engaged.text
    acted, visits = engaged.json()["result"]
    assert acted["label"] == "Engaged" and acted["action"]["type"] == "actions"
    assert sum(acted["data"]) == 6 and sum(visits["data"]) == 12  # b1 (3) or FR (4), one overlap

    for query, attr in (({"actions": [{"id": 3}]}, "actions__0"),
                        ({"events": [{"id": "visit"}], "breakdown": "[1]", "breakdown_type": "cohort"},
                         "breakdown_type"),
                        ({"events": [{"id": "visit", "math": "unique_group"}]}, "events__0__math"),
                        ({"events": [{"id": "visit"}], "shown_as": "Stickiness"}, "shown_as"),
                        ({"events": [{"id": "visit"}], "insight": "LIFECYCLE", "shown_as": "Lifecycle"}, "insight")):
        reply = project.trend(query, now=NOW)
        assert reply.status_code == 400 and reply.json()["code"] == "unsupported", reply.text
        assert reply.json()["attr"] == attr


def test_histogram_breakdown(project: ProjectHandle, running: Stack) -> None:
    amounts = [10, 12, 17.5, 20, 30, 30]
    events = [{**_event("paid", f"h{i}", "2024-03-02T10:00:00Z"), "properties": {"amount": a}}
              for i, a in enumerate(amounts)] + [_event("paid", "h9", "2024-03-02T11:00:00Z")]
    assert project.capture(events).status_code == 200
    running.wait_applied()
    reply = project.trend({"events": [{"id": "paid"}], "breakdown": "amount", "breakdown_histogram_bin_count": 2,
                           "date_from": "2024-03-02", "date_to": "2024-03-02", "refresh": "blocking"}, now=NOW)
    assert reply.status_code == 200, reply.text
    bins = {r["breakdown_value"]: (r["label"], r["data"]) for r in reply.json()["result"]}
    assert bins == {"[10,20]": ("[10,20]", [3]), "[20,30.01]": ("[20,30.01]", [3])}


def test_compare_to_a_year_earlier(project: ProjectHandle, running: Stack) -> None:
    events = [_event("renew", "y1", "2023-03-05T10:00:00Z"), _event("renew", "y2", "2023-03-06T10:00:00Z"),
              _event("renew", "y3", "2024-03-06T10:00:00Z")]
    assert project.capture(events).status_code == 200
    running.wait_applied()
    result = project.trend({"events": [{"id": "renew"}], "date_from": "2024-03-05", "date_to": "2024-03-06",
                            "compare": True, "compare_to": "-1y"}, now=NOW).json()["result"]
    assert [(r["compare_label"], r["days"], r["data"]) for r in result] == [
        ("current", ["2024-03-05", "2024-03-06"], [0, 1]),
        ("previous", ["2023-03-05", "2023-03-06"], [1, 1])]
    bad = project.trend({"events": [{"id": "renew"}], "compare_to": "last-year"}, now=NOW)
    assert bad.status_code == 400 and bad.json()["attr"] == "compare_to"
