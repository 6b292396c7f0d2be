"""A request's broker acknowledgements reach the event loop once, with the ends reached per partition."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from confluent_kafka import KafkaError

from serving.capture import _Delivery


@dataclass
class _Acked:
    """What a delivery report carries that capture reads: the partition and the offset written."""

    at: tuple[int, int]

    def partition(self) -> int:
        return self.at[0]

    def offset(self) -> int:
        return self.at[1]


def _deliver(reports: list[tuple[KafkaError | None, tuple[int, int] | None]]) -> tuple[object, int]:
    """Deliver the reports from another thread, as the producer's poll thread does; returns what the
    request's future got and how many callbacks the loop ran for it."""

    async def main() -> tuple[object, int]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        woken = 0
        original = loop.call_soon_threadsafe

        def counted(*args: object) -> object:
            nonlocal woken
            woken += 1
            return original(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        delivery = _Delivery(len(reports), loop, done)
        thread = threading.Thread(target=lambda: [delivery.delivered(err, _Acked(at) if at else None)
                                                  for err, at in reports])
        thread.start()
        result = await asyncio.wait_for(done, 5)
        thread.join()
        return result, woken

    return asyncio.run(main())


def test_the_loop_is_woken_once_with_the_next_offset_of_each_partition() -> None:
    reports = [(None, (p, o)) for o in range(200) for p in (0, 3)] + [(None, (1, 7))]
    (error, ends), woken = _deliver(reports)  # type: ignore[misc]
    assert error is None
    assert ends == {0: 200, 3: 200, 1: 8}
    assert woken == 1


def test_a_failed_record_fails_the_request_after_every_report() -> None:
    failed = KafkaError(KafkaError._MSG_TIMED_OUT)
    (error, ends), woken = _deliver([(None, (0, 4)), (failed, None), (None, (0, 5))])  # type: ignore[misc]
    assert error is failed and ends == {0: 6} and woken == 1
