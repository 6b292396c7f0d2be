"""The dataflow's dependencies: waiting for Redis, and the dead-letter topic.

A failure of a service is not a failure of an event: the dataflow waits for Redis with backoff
instead of crash-looping, and only a broker it cannot reach restarts it. What one event (or one
stored record) makes impossible is dead-lettered here, with its reason, and counted once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis
from confluent_kafka import Producer

from state.stream import Stream

log = logging.getLogger("insightflow.services")

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError (AOF replay) included


def wait_for_redis(client: redis.Redis, what: str, max_delay: float = 5.0) -> None:
    """Block until Redis answers, backing off; says so in the log while it waits."""
    delay, waited, last_said = 0.1, 0.0, -10.0
    while True:
        try:
            client.ping()
            if waited:
                log.info("%s: Redis is back after %.1f s", what, waited)
            return
        except REDIS_DOWN as exc:
            if waited - last_said >= 5:
                log.warning("%s: Redis is unavailable (%s); waiting", what, exc)
                last_said = waited
        time.sleep(delay)
        waited += delay
        delay = min(delay * 2, max_delay)


@dataclass
class Letter:
    """A record that cannot be applied: its bytes, why, and a stable id so it is counted once."""

    value: bytes
    reason: str
    record_id: str
    headers: dict[str, str] = field(default_factory=dict)


class DeadLetters:
    """`<topic>_dlq` with a `reason` header per record; `dlq_events` counts each record id once."""

    def __init__(self, bootstrap: str, dlq_topic: str, stream: Stream) -> None:
        self.topic, self.dlq_topic, self.stream = stream.topic, dlq_topic, stream
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4"})

    def send(self, letters: list[Letter]) -> None:
        """Produced and counted, or an exception (the broker is away: the caller's batch is retried)."""
        if not letters:
            return
        failures: list[str] = []

        def delivered(err: object, _msg: object) -> None:
            if err is not None:
                failures.append(str(err))

        for letter in letters:
            headers = {"reason": letter.reason[:4000], "source_topic": self.topic, **letter.headers}
            self.producer.produce(self.dlq_topic, value=letter.value, on_delivery=delivered,
                                  headers={k: v.encode() for k, v in headers.items()})
        self.producer.flush(30)
        if failures or len(self.producer):
            raise RuntimeError(f"dead-letter produce failed: {failures[0] if failures else 'not acknowledged'}")
        self.stream.count_dead_letters([letter.record_id for letter in letters])
        log.warning("dead-lettered %d record(s); first reason: %s", len(letters), letters[0].reason)

    def close(self) -> None:
        self.producer.flush(10)
