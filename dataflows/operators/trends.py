"""Always-on trend buckets: where one event's contribution lands (no I/O).

Counts are kept per project-zone hour and per project-zone day; distinct persons per day and per
hour. Wider intervals (week, month) combine days at query time, so one grain serves every request.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo

from schemas.dates import bucket_day, bucket_hour
from schemas.events import TopicEvent


@dataclass(frozen=True, slots=True)
class TrendBuckets:
    hour: int  # epoch seconds of the project-zone hour start
    day: str   # project-zone date, YYYYMMDD


_SLOT_MS = 15 * 60 * 1000  # every UTC offset in use is a multiple of 15 minutes


@lru_cache(maxsize=65_536)
def _slot_buckets(slot: int, tz: ZoneInfo) -> TrendBuckets:
    ts_ms = slot * _SLOT_MS
    return TrendBuckets(bucket_hour(ts_ms, tz), bucket_day(ts_ms, tz))


def trend_buckets(event: TopicEvent, tz: ZoneInfo) -> TrendBuckets:
    """Buckets are constant within a 15-minute slot, so they are computed once per slot and zone."""
    return _slot_buckets(event.ts_ms // _SLOT_MS, tz)
