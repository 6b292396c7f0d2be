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


def partition_count(bootstrap: str, topic: str) -> int:
    client = admin(bootstrap)
    return len(client.list_topics(topic, timeout=10).topics[topic].partitions)
