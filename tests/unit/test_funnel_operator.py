"""The per-actor funnel rules (spec §7.4, §7.5, §7.8, appendix A.2), without services."""

from __future__ import annotations

from dataflows.operators.funnels import StepEvent, funnel, ordered, ordered_attempts, unordered

HOUR = 3600.0


def ev(minute: float, *steps: int, uuid: str | None = None, excl: tuple[int, ...] = ()) -> StepEvent:
    return StepEvent(10 * HOUR + minute * 60, uuid or f"u{minute}-{steps}-{excl}", steps, excl)


def test_appendix_a2() -> None:
    a, b, x = (1,), (2,), ()
    r = ordered([ev(0, *a), ev(10, *b)], 2, HOUR)
    assert r is not None and r.steps_reached == 2 and r.gaps == [600]
    r = ordered([ev(0, *a), ev(5, *a), ev(10, *b)], 2, HOUR)
    assert r is not None and r.gaps == [300]  # the second A restarts the attempt
    assert ordered([ev(0, *a), ev(90, *b)], 2, HOUR).steps_reached == 1  # outside the window
    assert ordered([ev(-60, *b), ev(0, *a)], 2, HOUR).steps_reached == 1  # order matters
    strict = [ev(0, *a), ev(2, *x), ev(5, *b)]
    assert ordered(strict, 2, HOUR, strict=True).steps_reached == 1
    assert ordered(strict, 2, HOUR).steps_reached == 2
    assert ordered([ev(0, *a), ev(2, excl=(2,)), ev(5, *b)], 2, HOUR) is None  # removed entirely
    clean = ordered([ev(0, *a), ev(2, excl=(2,)), ev(3, *a), ev(5, *b)], 2, HOUR)
    assert clean is not None and clean.steps_reached == 2
    same = ordered([ev(0, *a, uuid="1"), ev(0, *b, uuid="2")], 2, HOUR)
    assert same is not None and same.steps_reached == 2 and same.gaps == [0]


def test_one_event_never_advances_one_attempt_twice() -> None:
    any_event = (1, 2, 3)  # steps with id null match every event
    assert ordered([ev(0, *any_event)], 3, HOUR).steps_reached == 1
    assert ordered([ev(0, *any_event), ev(1, *any_event)], 3, HOUR).steps_reached == 2
    assert ordered([ev(0, *any_event), ev(1, *any_event), ev(2, *any_event)], 3, HOUR).steps_reached == 3


def test_expired_attempt_is_still_disqualified() -> None:
    """§19.7: an exclusion that hits the newest attempt at the furthest step drops the actor."""
    window = 10.0
    events = [StepEvent(0, "a", (1,)), StepEvent(11, "x1", (), (2,)), StepEvent(12, "b", (1,)),
              StepEvent(13, "x2", (), (2,)), StepEvent(14, "c", (2,))]
    assert ordered(events, 2, window) is None


def test_unordered_and_attempts() -> None:
    events = [ev(0, 2), ev(1, 3), ev(2, 1)]
    result = unordered(events, 3, HOUR)
    assert result.steps_reached == 3 and result.gaps == [60, 60]
    assert unordered(events, 3, 30).steps_reached == 1
    stopped = unordered([ev(0, 1), ev(1, excl=(2,)), ev(2, 2)], 2, HOUR)
    assert stopped.steps_reached == 1  # the exclusion stopped the attempt; the step done before counts
    attempts = ordered_attempts([ev(0, 1), ev(5, 1), ev(10, 2)], 2, 8 * 60, "ordered")
    assert attempts == [(10 * HOUR, 1), (10 * HOUR + 300, 2)]
    assert funnel([ev(0, 1), ev(1, 2)], 2, HOUR, "unordered").steps_reached == 2
