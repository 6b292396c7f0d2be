"""A small realistic demo dataset: persons who view pages, some sign up, some buy.

Deterministic for a given day (seeded, uuid5 ids), so running `up` twice on one day captures the
same events and deduplication keeps every number unchanged.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

DEMO_PROJECT_ID = 1
DEMO_TOKEN = "phc_insightflow_demo"
DEMO_KEY = "phx_insightflow_demo_key"
PAGES = ["/", "/pricing", "/docs", "/blog", "/features", "/signup", "/checkout"]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge"]
COUNTRIES = ["US", "GB", "DE", "FR", "IN", "BR", "CA"]


def demo_events(persons: int = 2000, days: int = 30, today: datetime | None = None,
                seed: int = 7) -> Iterator[dict[str, Any]]:
    today = (today or datetime.now(UTC)).replace(hour=0, minute=0, second=0, microsecond=0)
    rng = random.Random(f"{seed}:{today.date()}")
    namespace = uuid.uuid5(uuid.NAMESPACE_DNS, f"insightflow-demo-{today.date()}")
    counter = 0
    last_moment = today + timedelta(days=1, microseconds=-1)

    def event(name: str, distinct_id: str, at: datetime, props: dict[str, Any]) -> dict[str, Any]:
        nonlocal counter
        counter += 1
        at = min(at, last_moment)  # a day's events stay on their day (capture clamps the far future)
        return {"event": name, "distinct_id": distinct_id, "timestamp": at.isoformat(),
                "uuid": str(uuid.uuid5(namespace, str(counter))), "properties": props}

    for p in range(persons):
        anon = f"anon-{p}"
        browser, country = rng.choice(BROWSERS), rng.choice(COUNTRIES)
        first_day = rng.randrange(days)
        active_days = sorted({min(days - 1, first_day + int(rng.expovariate(0.25))) for _ in range(rng.randint(1, 6))})
        identified: str | None = None
        for day in active_days:
            at = today - timedelta(days=days - 1 - day) + timedelta(seconds=rng.randrange(86_000))
            distinct = identified or anon
            for _ in range(rng.randint(1, 5)):
                at += timedelta(seconds=rng.randint(5, 300))
                page = rng.choice(PAGES)
                yield event("$pageview", distinct, at, {"$current_url": f"https://demo.insightflow.dev{page}",
                                                        "$pathname": page, "$browser": browser,
                                                        "$geoip_country_code": country})
            if identified is None and rng.random() < 0.4:
                identified = f"user-{p}@example.com"
                at += timedelta(seconds=30)
                yield event("$identify", identified, at, {"$anon_distinct_id": anon,
                                                          "$set": {"email": identified, "plan": "free"},
                                                          "$set_once": {"first_browser": browser}})
                yield event("signed up", identified, at + timedelta(seconds=1), {"$browser": browser})
            if identified is not None and rng.random() < 0.3:
                at += timedelta(seconds=120)
                yield event("purchase", identified, at, {"amount": round(rng.uniform(5, 200), 2),
                                                         "$set": {"plan": "paid"}})
