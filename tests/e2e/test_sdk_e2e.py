"""The real posthog-python SDK pointed at our capture endpoint."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
from posthog import Posthog

from tests.conftest import ProjectHandle, Stack


def test_posthog_python_sdk(project: ProjectHandle, running: Stack) -> None:
    client = Posthog(project.token, host=running.api_url, sync_mode=False, flush_at=50, flush_interval=0.2,
                     gzip=True, max_retries=1)
    day = datetime.now(UTC) - timedelta(days=1)
    for i in range(120):
        client.capture("sdk event", distinct_id=f"sdk-user-{i % 7}", timestamp=day.replace(hour=12, minute=i % 60),
                       properties={"i": i})
    client.set(distinct_id="sdk-user-1", properties={"plan": "pro"})
    client.flush()
    client.shutdown()
    running.wait_applied()
    date = day.strftime("%Y-%m-%d")
    result = project.trend({"events": [{"id": "sdk event"}, {"id": "sdk event", "math": "dau"}],
                            "date_from": date, "date_to": date}).json()["result"]
    assert result[0]["data"] == [120]
    assert result[1]["data"] == [7]


def test_sdk_sign_up_flow_counts_each_person_once(project: ProjectHandle, running: Stack) -> None:
    """posthog-python's sign-up flow: `capture` as an anonymous id, `alias(previous_id=anon,
    distinct_id=user)`, then `capture` as the user, over several flushes. Capture keys `$create_alias`
    by the anonymous id and the user's events by the user id, so they reach different partitions and
    either may be applied first; for a third of the persons the user's events are even sent before
    the alias. Every number counts each person once."""
    client = Posthog(project.token, host=running.api_url, sync_mode=False, flush_at=7, flush_interval=0.05,
                     max_retries=1)
    day = datetime(2024, 6, 3, tzinfo=UTC)
    persons = 18
    for i in range(persons):
        anon, user = f"anon-{i}", f"user-{i}"
        at = day + timedelta(hours=i % 6, minutes=i)
        client.capture("$pageview", distinct_id=anon, timestamp=at, properties={"$browser": "Chrome"})
        if i % 3 == 0:  # the user's events before the alias
            client.capture("signed up", distinct_id=user, timestamp=at + timedelta(minutes=5))
            client.flush()
            client.alias(previous_id=anon, distinct_id=user, timestamp=at + timedelta(minutes=4))
        else:
            client.alias(previous_id=anon, distinct_id=user, timestamp=at + timedelta(minutes=4))
            client.capture("signed up", distinct_id=user, timestamp=at + timedelta(minutes=5))
        if i % 2 == 0:
            client.capture("purchase", distinct_id=user, timestamp=at + timedelta(days=1))
        if i % 5 == 0:
            client.flush()
    client.flush()
    client.shutdown()
    running.wait_applied()
    days = {"date_from": "2024-06-03", "date_to": "2024-06-05"}
    funnel = {**days, "events": [{"id": "$pageview", "order": 0}, {"id": "signed up", "order": 1},
                                 {"id": "purchase", "order": 2}], "funnel_window_days": 14, "refresh": "blocking"}
    headers = {"Authorization": f"Bearer {project.key}"}
    base = f"{running.api_url}/api/environments/{project.id}/insights"
    steps = httpx.post(f"{base}/funnel/", json=funnel, headers=headers, timeout=60).json()["result"]
    assert [s["count"] for s in steps] == [persons, persons, persons // 2]
    series = [{"id": name, "math": math} for name in ("$pageview", "signed up", "purchase")
              for math in ("dau", "weekly_active")]
    result = project.trend({**days, "events": series}).json()["result"]
    assert [s["data"] for s in result] == [[persons, 0, 0], [persons, persons, persons],
                                           [persons, 0, 0], [persons, persons, persons],
                                           [0, persons // 2, 0], [0, persons // 2, persons // 2]]
    any_event = project.trend({**days, "events": [{"id": None, "math": "dau"}]}).json()["result"]
    assert any_event[0]["data"] == [persons, persons // 2, 0]
    people = httpx.get(f"{base}/funnel/people/", params={**{k: v if isinstance(v, str) else json.dumps(v)
                                                            for k, v in funnel.items()}, "funnel_step": 2},
                       headers=headers, timeout=60).json()["results"][0]
    assert people["count"] == persons
    assert sorted(sorted(p["distinct_ids"]) for p in people["people"]) == sorted(
        [f"anon-{i}", f"user-{i}"] for i in range(persons))
    retention = httpx.post(f"{base}/retention/", json={"period": "Day", "total_intervals": 3, "date_to": "2024-06-05",
                                                       "target_entity": {"id": "$pageview", "type": "events"},
                                                       "returning_entity": {"id": "purchase", "type": "events"}},
                           headers=headers, timeout=60).json()["result"]
    assert [v["count"] for v in retention[0]["values"]] == [persons, persons // 2, 0]
