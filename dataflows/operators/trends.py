"""Always-on trend buckets: where one event's contribution lands (no I/O).

Counts are kept per project-zone hour and per project-zone day; distinct persons per day and per
hour. Wider intervals (week, month) combine days at query time, so one grain serves every request.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np

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


def slot_buckets(ts_ms: np.ndarray, tz: ZoneInfo) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Buckets of many event times at once: (hour start per event, day index per event, the days),
    each 15-minute slot computed once."""
    slots, where = np.unique(ts_ms // _SLOT_MS, return_inverse=True)
    found = [_slot_buckets(int(s), tz) for s in slots]
    days = sorted({b.day for b in found})
    day_index = {d: i for i, d in enumerate(days)}
    hours = np.array([b.hour for b in found], dtype=np.int64)
    day_of = np.array([day_index[b.day] for b in found], dtype=np.int64)
    return hours[where], day_of[where], days
