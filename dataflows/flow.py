"""The ingestion dataflow: Kafka `events` -> parse/validate -> per-project state in Redis.

Run with recovery on and a snapshot (epoch) interval of 1 s, as `insightflow up` does:

    python -m bytewax.recovery .insightflow/recovery 1
    python -m bytewax.run dataflows.flow:flow -r .insightflow/recovery -s 1 -b 10
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime

import bytewax.operators as op
import redis
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer

from dataflows.definitions import BackfillSink, BackfillSource, DefinitionCache, contributions
from dataflows.kafka import EventsSource, ensure_topics, topic_id
from dataflows.operators.validate import Parsed, parse_record
from dataflows.state import Located, ProjectBatch, StaleDefinitions, StateStore
from schemas.dates import zone
from schemas.registry import DefinitionRegistry, ProjectCache, Registry
from schemas.settings import Settings

log = logging.getLogger("insightflow.dataflow")


class _StatePartition(StatelessSinkPartition[Parsed]):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = client = redis.Redis.from_url(settings.redis_url)
        self.store = StateStore(client)
        self.projects = ProjectCache(Registry(client))
        self.definitions = DefinitionCache(DefinitionRegistry(client))
        self.topic_id = topic_id(settings.kafka_bootstrap, settings.topic)
        self.store.reset_stream(settings.topic, self.topic_id)
        self.dlq = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 20,
                             "compression.type": "lz4"})

    def write_batch(self, items: list[Parsed]) -> None:
        by_project: dict[int, list] = defaultdict(list)
        dead: list[tuple[Parsed, str]] = []
        applied: dict[int, int] = {}
        ends: dict[int, int] = {}
        for item in items:
            rec = item.record
            applied[rec.partition] = max(applied.get(rec.partition, 0), rec.offset + 1)
            ends[rec.partition] = max(ends.get(rec.partition, 0), rec.high_watermark)
            event = item.event
            if event is None:
                dead.append((item, item.reason or "invalid event"))
                continue
            project = (self.projects.by_id(event.project_id) if event.project_id is not None
                       else self.projects.by_token(event.token or ""))
            if project is None:
                named = f"project {event.project_id}" if event.project_id is not None else "project token"
                dead.append((item, f"unknown {named}"))
                continue
            if event.project_id is None:
                event = replace(event, project_id=project.id)
            by_project[project.id].append(Located(event, rec.partition, rec.offset))
        for attempt in range(20):
            now = datetime.now(UTC)
            batches = []
            for pid, (generation, definitions) in self.definitions.current(list(by_project)).items():
                located = by_project[pid]
                flags = contributions(self.client, pid, definitions, located, now)
                tz = zone(self.projects.by_id(pid).timezone)  # type: ignore[union-attr]
                batches.append(ProjectBatch(pid, tz, located, flags, generation))
            try:
                self.store.apply(batches)
                break
            except StaleDefinitions as exc:  # a registration raced this batch: plan it again
                log.info("%s (attempt %d)", exc, attempt + 1)
        else:
            raise RuntimeError("definitions kept changing while applying a batch")
        if dead:
            self._dead_letter(dead)
        self.store.record_offsets(self.settings.topic, applied, ends)

    def _dead_letter(self, dead: list[tuple[Parsed, str]]) -> None:
        failures: list[str] = []

        def delivered(err: object, _msg: object) -> None:
            if err is not None:
                failures.append(str(err))

        for item, reason in dead:
            rec = item.record
            self.dlq.produce(self.settings.dlq_topic, value=rec.value, on_delivery=delivered, headers={
                "reason": reason.encode(), "source_topic": self.settings.topic.encode(),
                "source_partition": str(rec.partition).encode(), "source_offset": str(rec.offset).encode(),
            })
        self.dlq.flush(30)
        if failures:
            raise RuntimeError(f"dead-letter produce failed: {failures[0]}")  # restart and replay
        self.store.count_dead_letters(
            self.settings.topic, [f"{self.topic_id}:{i.record.partition}:{i.record.offset}" for i, _ in dead])
        log.warning("dead-lettered %d event(s); first reason: %s", len(dead), dead[0][1])

    def close(self) -> None:
        self.dlq.flush(10)


class StateSink(DynamicSink[Parsed]):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StatePartition:
        return _StatePartition(self.settings)


def build_flow(settings: Settings) -> Dataflow:
    ensure_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], settings.partitions)
    flow = Dataflow("insightflow")
    records = op.input("events", flow, EventsSource(settings.kafka_bootstrap, settings.topic))
    parsed = op.map("parse", records, parse_record)
    op.output("state", parsed, StateSink(settings))
    history = op.input("backfill", flow, BackfillSource(settings))
    op.output("backfill_state", history, BackfillSink(settings))
    return flow


def flow_from_env() -> Dataflow:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return build_flow(Settings.from_env())
