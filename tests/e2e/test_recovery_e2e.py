"""kill -9 of the dataflow mid-stream, then a restart from Bytewax recovery: every number stays exact."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict

from tests.conftest import ProjectHandle, Stack

NOW = "2024-05-31T12:00:00Z"


def test_kill9_mid_stream_keeps_numbers_exact(project: ProjectHandle, running: Stack) -> None:
    rng = random.Random(11)
    events = []
    for _ in range(30_000):
        day = rng.randint(1, 30)
        events.append({"event": rng.choice(["$pageview", "click", "purchase"]),
                       "distinct_id": f"person-{rng.randrange(500)}", "uuid": str(uuid.uuid4()),
                       "timestamp": f"2024-05-{day:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"})
    sent: list[dict] = []

    def send() -> None:
        for start in range(0, len(events), 500):
            chunk = events[start:start + 500]
            reply = project.capture(chunk)
            assert reply.status_code == 200, reply.text
            sent.extend(chunk)
            time.sleep(0.05)  # keep the stream flowing across both kills

    sender = threading.Thread(target=send)
    sender.start()
    killed_at = []
    for _ in range(2):  # two crashes while events stream in
        time.sleep(1.5)
        killed_at.append(len(sent))
        running.restart_dataflow(kill9=True)
    sender.join()
    assert all(0 < at < len(events) for at in killed_at), killed_at
    assert len(sent) == len(events)
    running.wait_applied(timeout=120)

    totals: dict[str, Counter] = defaultdict(Counter)
    persons: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for e in sent:
        totals[e["event"]][e["timestamp"][:10]] += 1
        persons[e["event"]][e["timestamp"][:10]].add(e["distinct_id"])
    days = [f"2024-05-{d:02d}" for d in range(1, 31)]
    for name in ("$pageview", "click", "purchase"):
        body = project.trend({"events": [{"id": name}, {"id": name, "math": "dau"}],
                              "date_from": "2024-05-01", "date_to": "2024-05-30"}, now=NOW).json()
        total, dau = body["result"]
        assert total["days"] == days
        assert total["data"] == [totals[name][d] for d in days], name
        assert dau["data"] == [len(persons[name][d]) for d in days], name
