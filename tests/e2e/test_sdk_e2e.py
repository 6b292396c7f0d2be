"""The real posthog-python SDK pointed at our capture endpoint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
