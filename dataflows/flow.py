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
from functools import partial

import bytewax.operators as op
import redis
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflows.definitions import BackfillSink, BackfillSource, DefinitionCache, contributions
from dataflows.kafka import EventsSource
from dataflows.operators.persons import person_update
from dataflows.operators.trends import trend_buckets
from dataflows.operators.validate import Parsed, parse_record
from dataflows.services import REDIS_DOWN, DeadLetters, Letter, wait_for_redis
from schemas.dates import zone
from schemas.events import Record
from schemas.settings import Settings
from state.registry import DefinitionRegistry, ProjectCache, Registry
from state.store import (
    Applied,
    Located,
    ProjectBatch,
    RedisLostWrites,
    StaleDefinitions,
    StateStore,
    event_args,
    set_contributions,
)
from state.stream import Stream
from state.topics import ensure_topics, topic_id

log = logging.getLogger("insightflow.dataflow")


def _record_id(topic_id: str, record: Record) -> str:
    return f"{topic_id}:{record.partition}:{record.offset}"


class _StatePartition(StatelessSinkPartition[Parsed]):
    """Applies parsed records to Redis. No record can stop it: whatever one event makes impossible is
    dead-lettered with the reason, and a definition that cannot keep its state is marked failed.
    Redis being away is waited out; the broker being away restarts the dataflow (with backoff)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = client = redis.Redis.from_url(settings.redis_url)
        wait_for_redis(client, "state sink")
        self.store = StateStore(client)
        self.projects = ProjectCache(Registry(client))
        self.registry = DefinitionRegistry(client)
        self.definitions = DefinitionCache(self.registry)
        self.topic_id = topic_id(settings.kafka_bootstrap, settings.topic)
        self.stream = Stream(client, settings.topic)
        self.stream.reset(self.topic_id)
        self.dead = DeadLetters(settings.kafka_bootstrap, settings.dlq_topic, self.stream)
        self.recorded: dict[int, int] = {}  # partition -> next offset this process recorded as applied

    def write_batch(self, items: list[Parsed]) -> None:
        while True:
            try:
                self._check_writes_kept()
                self._write(items)
                return
            except REDIS_DOWN as exc:
                log.warning("Redis went away while applying a batch (%s)", exc)
                wait_for_redis(self.client, "state sink")

    def _check_writes_kept(self) -> None:
        """Before each batch: if Redis lost writes this process made (it restarted from an append-only
        file that missed them: a machine crash between syncs, or an older copy), restart, so the source
        resumes from the offsets Redis has and nothing is missing. Redis clients reconnect by
        themselves, so a restart is not always seen as an error: the offsets are what tells."""
        if not self.recorded:
            return
        held = self.stream.applied_offsets(self.topic_id) or {}
        behind = {p: (held.get(p, 0), mine) for p, mine in self.recorded.items() if held.get(p, 0) < mine}
        if behind:
            raise RedisLostWrites(f"Redis came back without applied offsets this process wrote "
                                  f"(partition: (Redis, ours) {behind}); restarting to re-apply from Redis's")

    def _write(self, items: list[Parsed]) -> None:
        by_project: dict[int, list[Located]] = defaultdict(list)
        letters: dict[str, Letter] = {}
        applied: dict[int, int] = {}
        ends: dict[int, int] = {}

        def dead(record: Record, reason: str) -> None:
            rid = _record_id(self.topic_id, record)
            letters.setdefault(rid, Letter(record.value, reason, rid, {
                "source_partition": str(record.partition), "source_offset": str(record.offset)}))

        for item in items:
            rec = item.record
            applied[rec.partition] = max(applied.get(rec.partition, 0), rec.offset + 1)
            ends[rec.partition] = max(ends.get(rec.partition, 0), rec.high_watermark)
            event = item.event
            if event is None:
                dead(rec, item.reason or "invalid event")
                continue
            project = (self.projects.by_id(event.project_id) if event.project_id is not None
                       else self.projects.by_token(event.token or ""))
            if project is None:
                named = f"project {event.project_id}" if event.project_id is not None else "project token"
                dead(rec, f"unknown {named}")
                continue
            if event.project_id is None:
                event = replace(event, project_id=project.id)
            located = Located(event, rec.partition, rec.offset)
            try:  # everything the event alone decides: buckets, person update, encodings
                buckets = trend_buckets(event, zone(project.timezone))
                located.args = event_args(event, buckets.hour, buckets.day, person_update(event), rec.partition,
                                          rec.offset)
            except Exception as exc:
                dead(rec, f"cannot be applied: {type(exc).__name__}: {exc}")
                continue
            by_project[project.id].append(located)
        for attempt in range(20):
            result = self._apply(by_project)
            if result is not None:
                break
            log.info("definitions changed while planning a batch (attempt %d)", attempt + 1)
        else:
            raise RuntimeError("definitions kept changing while applying a batch")
        for (project_id, h), reason in result.failed.items():
            self._fail(project_id, h, f"Redis refused its state: {reason}")
        self.dead.send(list(letters.values()))
        self.stream.record(applied, ends)
        for partition, offset in applied.items():
            self.recorded[partition] = max(self.recorded.get(partition, 0), offset)

    def _apply(self, by_project: dict[int, list[Located]]) -> Applied | None:
        """Plan each project's events against its current definitions and apply them; None when a
        definition was registered or failed meanwhile (plan again)."""
        now = datetime.now(UTC)
        batches = []
        for pid, (generation, definitions) in self.definitions.current(list(by_project)).items():
            flags, failed = contributions(self.client, pid, definitions, by_project[pid], now)
            for h, reason in failed.items():
                self._fail(pid, h, reason)
            tz = zone(self.projects.by_id(pid).timezone)  # type: ignore[union-attr]
            for item in by_project[pid]:
                assert item.args is not None
                set_contributions(item.args, item.contributions)
            batches.append(ProjectBatch(pid, tz, by_project[pid], flags, generation))
        try:
            return self.store.apply(batches)
        except StaleDefinitions:
            return None

    def _fail(self, project_id: int, h: str, reason: str) -> None:
        if self.registry.fail(project_id, h, reason):
            log.error("definition %s of project %s failed and is no longer kept: %s", h, project_id, reason)

    def close(self) -> None:
        self.dead.close()


class StateSink(DynamicSink[Parsed]):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StatePartition:
        return _StatePartition(self.settings)


def _applied_offsets(settings: Settings, topic_id: str) -> dict[int, int] | None:
    client = redis.Redis.from_url(settings.redis_url)
    wait_for_redis(client, "events source")
    try:
        return Stream(client, settings.topic).applied_offsets(topic_id)
    finally:
        client.close()


def build_flow(settings: Settings) -> Dataflow:
    ensure_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], settings.partitions)
    flow = Dataflow("insightflow")
    records = op.input("events", flow, EventsSource(settings.kafka_bootstrap, settings.topic,
                                                    applied=partial(_applied_offsets, settings)))
    parsed = op.map("parse", records, parse_record)
    op.output("state", parsed, StateSink(settings))
    history = op.input("backfill", flow, BackfillSource(settings))
    op.output("backfill_state", history, BackfillSink(settings))
    return flow


def flow_from_env() -> Dataflow:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return build_flow(Settings.from_env())
