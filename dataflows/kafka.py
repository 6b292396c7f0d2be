"""The partitioned events source, with offsets in its snapshot.

The source emits `Record`s carrying partition, offset and the partition's high watermark so the
sink can record exactly what state reflects. Its snapshot stores the topic's `topic_id` with the
offset: a recreated topic (Tansu loses topics on restart) is read from the start instead of from
an offset that now points past its end (docs/measured.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from schemas.events import Record
from state.topics import partition_count, topic_id

log = logging.getLogger(__name__)
_IDLE = timedelta(milliseconds=20)


class _EventsPartition(StatefulSourcePartition[Record, dict]):
    def __init__(self, bootstrap: str, topic: str, partition: int, topic_id: str, start: int,
                 batch_size: int) -> None:
        self.topic, self.partition, self.topic_id = topic, partition, topic_id
        self.batch_size = batch_size
        self.next_offset = start
        self._tp = TopicPartition(topic, partition)
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": "insightflow-dataflow",  # assign() only: never joins the group
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "queued.min.messages": 200_000,
            "fetch.wait.max.ms": 50,
        })
        self.consumer.assign([TopicPartition(topic, partition, start if start > 0 else OFFSET_BEGINNING)])
        self._awake: datetime | None = None

    def next_batch(self) -> list[Record]:
        messages = self.consumer.consume(self.batch_size, timeout=0)
        if not messages:
            self._awake = datetime.now(UTC) + _IDLE
            return []
        self._awake = None
        _low, high = self.consumer.get_watermark_offsets(self._tp, cached=True)
        out = []
        for message in messages:
            if message.error():
                log.warning("kafka error on %s[%d]: %s", self.topic, self.partition, message.error())
                continue
            offset = message.offset()
            high = max(high, offset + 1)
            kind, ts = message.timestamp()
            out.append(Record(self.partition, offset, high, message.value() or b"", ts if kind else None))
            self.next_offset = offset + 1
        return out

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> dict:
        return {"topic_id": self.topic_id, "offset": self.next_offset}

    def close(self) -> None:
        self.consumer.close()


class EventsSource(FixedPartitionedSource[Record, dict]):
    """Every partition of the events topic, resumable from Bytewax recovery snapshots.

    `applied(topic_id)` says up to where state holds each partition's events (None: it holds none of
    this topic). A partition resumes from the lower of that and its snapshot: state that lost its
    last writes (Redis killed between AOF syncs) is caught up again, and applying twice is harmless.
    """

    def __init__(self, bootstrap: str, topic: str, batch_size: int = 20000,
                 applied: Callable[[str], dict[int, int] | None] | None = None) -> None:
        self.bootstrap, self.topic, self.batch_size = bootstrap, topic, batch_size
        self.applied = applied

    def list_parts(self) -> list[str]:
        return [str(p) for p in range(partition_count(self.bootstrap, self.topic))]

    def build_part(self, step_id: str, for_part: str, resume_state: dict | None) -> _EventsPartition:
        current = topic_id(self.bootstrap, self.topic)
        start = 0
        if resume_state and resume_state.get("topic_id") == current:
            start = int(resume_state["offset"])
        elif resume_state:
            log.warning("topic %s was recreated (id %s, was %s): reading partition %s from the start",
                        self.topic, current, resume_state.get("topic_id"), for_part)
        if start > 0 and self.applied is not None:
            held = (self.applied(current) or {}).get(int(for_part), 0)
            if held < start:
                log.warning("partition %s: state holds events up to offset %d, the snapshot %d: resuming from %d",
                            for_part, held, start, held)
                start = held
        return _EventsPartition(self.bootstrap, self.topic, int(for_part), current, start, self.batch_size)
