"""Saved insights' timestamps (schemas/saved.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from schemas.saved import iso_now

pytestmark = pytest.mark.unit


def test_now_is_one_reading_of_the_clock_even_just_before_a_second_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([1_732_770_266_999_999_000, 1_732_770_267_000_002_000])  # the second ends between them
    monkeypatch.setattr(time, "time_ns", lambda: next(readings))
    monkeypatch.setattr(time, "time", lambda: next(readings) / 1e9)
    assert iso_now() == "2024-11-28T05:04:26.999999Z"


def test_now_never_goes_back() -> None:
    seen = [iso_now() for _ in range(20_000)]
    assert seen == sorted(seen)
    assert abs(datetime.fromisoformat(seen[-1]) - datetime.now(UTC)).total_seconds() < 5
