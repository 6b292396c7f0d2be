"""The API's summary caches stay within their byte budget, dropping the least recently used."""

from __future__ import annotations

import numpy as np

from state.summaries import _Bounded, size_of


def test_least_recently_used_leave_first() -> None:
    cache = _Bounded(budget=3000)
    for day in ("d1", "d2", "d3"):
        cache.put(day, np.zeros(125, dtype=np.int64))  # 1,000 bytes each: all fit
    assert cache.get("d1") is not None  # d1 is now the most recently used
    cache.put("d4", np.zeros(125, dtype=np.int64))
    assert cache.get("d2") is None and cache.get("d1") is not None and cache.get("d4") is not None
    assert cache.used <= 3000
    cache.put("big", np.zeros(1000, dtype=np.int64))  # larger than the budget alone: kept, the rest go
    assert cache.get("big") is not None and cache.get("d1") is None and cache.used == 8000


def test_sizes_count_arrays_inside_tuples() -> None:
    rows = np.zeros((10, 4), dtype=np.int64)
    assert size_of((1, rows)) == 64 + 320 + 16
