"""The dataflow's apply queue (dataflows/flow.py, `_Applier`): chunks go in one at a time, in the
order they were planned, and nothing goes in after one that failed."""

from __future__ import annotations

import threading

import pytest

from dataflows.flow import _Applier, _Chunk


def _chunk(n: int) -> _Chunk:
    return _Chunk({n: []}, {})


def test_chunks_are_applied_one_at_a_time_in_the_order_they_were_queued() -> None:
    applied: list[int] = []
    running = threading.Semaphore(1)
    gate = threading.Event()

    def apply(chunk: _Chunk) -> None:
        assert running.acquire(blocking=False), "two chunks applied at once"
        try:
            gate.wait(5)
            applied.extend(chunk.pending)
        finally:
            running.release()

    applier = _Applier(apply)
    for n in range(10):
        applier.submit(_chunk(n))
    assert len(applier.queue) == 10 and applied == []
    gate.set()
    applier.wait_below(3)
    assert len(applier.queue) < 3 and applied[:8] == list(range(8))
    applier.close()
    assert applied == list(range(10)) and not applier.queue


def test_after_a_chunk_fails_no_later_chunk_is_applied_and_the_failure_is_raised() -> None:
    applied: list[int] = []

    def apply(chunk: _Chunk) -> None:
        (n,) = chunk.pending
        if n == 3:
            raise ValueError("state refused")
        applied.append(n)

    applier = _Applier(apply)
    futures = [applier.submit(_chunk(n)) for n in range(6)]
    with pytest.raises(ValueError, match="state refused"):
        applier.wait_below(0)
    applier.settle()
    assert applied == [0, 1, 2] and not applier.queue
    with pytest.raises(RuntimeError, match="earlier chunk"):
        futures[5].result()
