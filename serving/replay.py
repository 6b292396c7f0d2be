"""Replay history into the events topic: an NDJSON export or another topic.

Records go through the same validation as capture; events keep their uuid (or get a deterministic
one), so replaying overlapping history never counts an event twice.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from rich.progress import Progress

from schemas.events import InvalidEvent, TopicEvent, parse_topic_event
from state.connection import connect
from state.stream import Stream
from state.topics import partition_count


def _normalise(raw: bytes, project: int | None) -> TopicEvent:
    if project is not None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(f"not valid JSON: {exc}") from exc
        if isinstance(body, dict) and "project_id" not in body and "token" not in body and "api_key" not in body:
            body["project_id"] = project
            raw = orjson.dumps(body)
    event = parse_topic_event(raw)
    return event


def _produce(records: Iterable[bytes], total: int | None, bootstrap: str, topic: str,
             project: int | None, redis_url: str | None) -> tuple[int, int]:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 100, "batch.num.messages": 10_000,
                         "compression.type": "lz4"})
    failures: list[str] = []
    ends: dict[int, int] = {}

    def delivered(err: object, msg: object) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)  # type: ignore[attr-defined]

    sent = bad = 0
    with Progress() as progress:
        task = progress.add_task("replaying", total=total)
        for number, raw in enumerate(records, 1):
            try:
                event = _normalise(raw, project)
            except InvalidEvent as exc:
                bad += 1
                print(f"line {number}: {exc}", file=sys.stderr)
                progress.advance(task)  # a skipped line is done too: the bar reaches its end
                continue
            while True:
                try:
                    producer.produce(topic, key=event.key, value=event.to_json(), on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.05)
            sent += 1
            progress.advance(task)
        producer.flush(60)
    if failures:
        raise RuntimeError(f"{len(failures)} event(s) not acknowledged by the broker: {failures[0]}")
    if redis_url and ends:  # so /readyz counts them as lag until applied (the broker may under-report)
        Stream(connect(redis_url), topic).record({}, ends)
    return sent, bad


def replay_file(path: Path, bootstrap: str, topic: str, project: int | None,
                redis_url: str | None = None) -> tuple[int, int]:
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    return _produce(lines, len(lines), bootstrap, topic, project, redis_url)


def _topic_records(source: str, bootstrap: str) -> Iterator[bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "insightflow-replay",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    partitions = partition_count(bootstrap, source)
    consumer.assign([TopicPartition(source, p, 0) for p in range(partitions)])
    done: set[int] = set()
    idle_since = datetime.now(UTC)
    while len(done) < partitions and (datetime.now(UTC) - idle_since).total_seconds() < 10:
        message = consumer.poll(0.5)
        if message is None:
            continue
        idle_since = datetime.now(UTC)
        if message.error():
            if message.error().code() == -191:  # _PARTITION_EOF
                done.add(message.partition())
            continue
        yield message.value() or b""
    consumer.close()


def replay_topic(source: str, bootstrap: str, topic: str, project: int | None,
                 redis_url: str | None = None) -> tuple[int, int]:
    return _produce(_topic_records(source, bootstrap), None, bootstrap, topic, project, redis_url)
