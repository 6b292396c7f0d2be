"""Stream bookkeeping in Redis: per topic, the offsets applied (recorded with the state) and known to
exist (acknowledged to capture, fetched by the dataflow), the topic's id and the dead-letter count.
The dataflow's sources resume from it; /readyz answers lag from it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
import redis

from state import keys, scripts


@dataclass(frozen=True)
class StreamProgress:
    """What Redis holds of one topic."""

    topic_id: str | None = None
    applied: dict[int, int] = field(default_factory=dict)  # partition -> next offset applied
    ends: dict[int, int] = field(default_factory=dict)  # partition -> end offset known
    dlq_events: int = 0
    previous_topic_id: str | None = None  # the topic this one replaced (a broker that lost its topics)
    recreated_at_ms: int | None = None  # when the dataflow noticed

    def lag(self, broker_ends: dict[int, int] | None = None) -> int:
        """Events known to be in the topic but not yet applied. What is known: offsets capture saw
        acknowledged, high watermarks the dataflow fetched, and the broker's end offsets (exact on
        Kafka; a lower bound on Tansu, docs/measured.md)."""
        ends = dict(broker_ends or {})
        for partition, end in self.ends.items():
            ends[partition] = max(ends.get(partition, 0), end)
        return sum(max(0, end - self.applied.get(p, 0)) for p, end in ends.items())


def read_progress(raw: dict[bytes, bytes]) -> StreamProgress:
    """Decode a topic's stream hash."""
    applied: dict[int, int] = {}
    ends: dict[int, int] = {}
    for name_partition, value in raw.items():
        name, _, partition = name_partition.decode().partition(":")
        if name == "applied":
            applied[int(partition)] = int(value)
        elif name == "end":
            ends[int(partition)] = int(value)
    topic_id, previous, at = raw.get(b"topic_id"), raw.get(b"previous_topic_id"), raw.get(b"recreated_at_ms")
    return StreamProgress(topic_id.decode() if topic_id is not None else None, applied, ends,
                          int(raw.get(b"dlq_events", 0)), previous.decode() if previous is not None else None,
                          int(at) if at is not None else None)


class Stream:
    """One topic's bookkeeping. Every write only raises numbers or adds ids: safe to repeat and out of
    order, so capture, the dataflow and replay write it without coordination."""

    def __init__(self, client: redis.Redis, topic: str) -> None:
        self.redis, self.topic = client, topic
        self._raise = client.register_script(scripts.RAISE_FIELDS.source)
        self._count_dlq = client.register_script(scripts.COUNT_DEAD_LETTERS.source)
        self._reset = client.register_script(scripts.RESET_STREAM.source)

    def record(self, applied: dict[int, int], ends: dict[int, int]) -> None:
        """Raise the applied and known end offsets per partition."""
        args: list[str | int] = []
        for partition, offset in applied.items():
            args += [f"applied:{partition}", offset]
        for partition, offset in ends.items():
            args += [f"end:{partition}", offset]
        if args:
            self._raise(keys=[keys.stream(self.topic)], args=args)

    def count_dead_letters(self, record_ids: Sequence[str]) -> int:
        """Count dead-lettered records once each; returns how many were new."""
        if not record_ids:
            return 0
        return int(self._count_dlq(keys=[keys.dlq_seen(self.topic), keys.stream(self.topic)], args=list(record_ids)))

    def reset(self, topic_id: str, ends: dict[int, int] | None = None) -> bool:
        """The topic was recreated (Tansu restart, or by hand): its offsets mean something new, and
        `ends` (the new topic's end offsets, read before) replace the old ones in the same write. The
        dead-letter count is a count of what happened, not of this topic's offsets: it stays. True
        when this call noticed a topic that replaced another."""
        return bool(self._reset(keys=[keys.stream(self.topic), keys.dlq_seen(self.topic)],
                                args=[topic_id, int(time.time() * 1000),
                                      orjson.dumps({str(p): e for p, e in (ends or {}).items()})]))

    def progress(self) -> StreamProgress:
        return read_progress(self.redis.hgetall(keys.stream(self.topic)))

    def applied_offsets(self, topic_id: str) -> dict[int, int] | None:
        """Partition -> next offset whose events are applied, as Redis has it; None when Redis holds no
        offsets of this topic (a recreated topic, or a Redis that lost or never had them)."""
        progress = self.progress()
        return progress.applied if progress.topic_id == topic_id else None
