"""Always-on trend buckets: where one event's contribution lands (no I/O).

Counts are kept per project-zone hour and per project-zone day; distinct persons per day and per
hour. Wider intervals (week, month) combine days at query time, so one grain serves every request.
"""

from __future__ import annotations

from dataclasses import dataclass
from zoneinfo import ZoneInfo

from schemas.dates import bucket_day, bucket_hour
from schemas.events import TopicEvent


@dataclass(frozen=True, slots=True)
class TrendBuckets:
    hour: int  # epoch seconds of the project-zone hour start
    day: str   # project-zone date, YYYYMMDD


def trend_buckets(event: TopicEvent, tz: ZoneInfo) -> TrendBuckets:
    return TrendBuckets(bucket_hour(event.ts_ms, tz), bucket_day(event.ts_ms, tz))
