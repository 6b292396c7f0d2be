"""The bare pipeline the dataflow is measured against (issue 13): Bytewax's stock `KafkaSource` ->
orjson -> an exact count per (event, hour) -> pipelined Redis writes. No persons, no guards.

    python -m bytewax.run bench.bare:flow      (env BARE_BOOTSTRAP, BARE_TOPIC, BARE_REDIS, BARE_PARTITIONS)
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime

import bytewax.operators as op
import orjson
import redis
from bytewax.connectors.kafka import KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition

DONE = "bench:bare:events"


def _hour(value: bytes | None) -> tuple[str, int]:
    event = orjson.loads(value or b"{}")
    hour = int(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()) // 3600 * 3600
    return event["event"], hour


class _Counts(StatelessSinkPartition[tuple[str, int]]):
    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def write_batch(self, items: list[tuple[str, int]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for (event, hour), n in Counter(items).items():
            pipe.hincrby(f"bench:bare:{event}", str(hour), n)
        pipe.incrby(DONE, len(items))
        pipe.execute()


class _Sink(DynamicSink[tuple[str, int]]):
    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Counts:
        return _Counts(os.environ["BARE_REDIS"])


flow = Dataflow("bare")
_messages = op.input("kafka", flow, KafkaSource([os.environ.get("BARE_BOOTSTRAP", "")],
                                                 [os.environ.get("BARE_TOPIC", "events")], tail=True,
                                                 starting_offset=-2, batch_size=10_000))
_values = op.map("value", _messages, lambda m: m.value)  # type: ignore[attr-defined]
op.output("redis", op.map("hour", _values, _hour), _Sink())
