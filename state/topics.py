"""The topics: creating them and reading what they are (id, partitions). Used by the dataflow, the
CLI, replay and the tests, so none of them reaches into another's internals."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger(__name__)


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def ensure_topics(bootstrap: str, topics: list[str], partitions: int, timeout: float = 30.0) -> None:
    """Create the topics if missing (partition counts are fixed at creation on Tansu)."""
    client = admin(bootstrap)
    deadline = time.monotonic() + timeout
    while True:
        try:
            existing = client.list_topics(timeout=5).topics
            break
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    missing = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
    if missing:
        for name, future in client.create_topics(missing).items():
            try:
                future.result()
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
                log.info("topic %s created concurrently", name)


def topic_id(bootstrap: str, topic: str) -> str:
    client = admin(bootstrap)  # keep the handle alive until the future resolves
    result = client.describe_topics(TopicCollection([topic]))[topic].result()
    return str(result.topic_id)


class TopicIdentity:
    """The topic's current id, asked of the broker at most once per `ttl` seconds (for /readyz), with
    one admin client kept for it."""

    def __init__(self, bootstrap: str, topic: str, ttl: float = 1.0) -> None:
        self.bootstrap, self.topic, self.ttl = bootstrap, topic, ttl
        self._admin: AdminClient | None = None
        self._seen: tuple[float, str | None] = (0.0, None)

    def current(self) -> str | None:
        at, found = self._seen
        if time.monotonic() - at > self.ttl:
            try:
                if self._admin is None:
                    self._admin = admin(self.bootstrap)
                described = self._admin.describe_topics(TopicCollection([self.topic]), request_timeout=2.0)
                found = str(described[self.topic].result(2.0).topic_id)
            except Exception:  # the broker away or slow: not known this time
                found = None
            self._seen = (time.monotonic(), found)
        return found


def partition_count(bootstrap: str, topic: str) -> int:
    client = admin(bootstrap)
    return len(client.list_topics(topic, timeout=10).topics[topic].partitions)


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition -> the broker's high watermark (the next offset it will write)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "insightflow-ends", "enable.auto.commit": False})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partition_count(bootstrap, topic))}
    finally:
        consumer.close()
