"""The ingestion dataflow: Kafka `events` -> parse/validate -> per-project state in Redis.

Run with recovery on and 0.2 s epochs (the snapshot interval), as `insightflow up` does
(dataflows/run.py says why not Bytewax's own runner):

    python -m bytewax.recovery .insightflow/recovery 1
    python -m dataflows.run .insightflow/recovery
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflows.definitions import BackfillSink, BackfillSource, DefinitionCache, contributions, fail_definition
from dataflows.kafka import EventsSource
from dataflows.operators.batch import KnownFirsts, Occurrence, batch_effects
from dataflows.operators.persons import KnownPersons, PersonProperties
from dataflows.operators.trends import trend_buckets
from dataflows.operators.validate import Parsed, parse_record
from dataflows.services import REDIS_DOWN, DeadLetters, Letter, wait_for_redis
from schemas.dates import zone
from schemas.definitions import Definition
from schemas.events import Record
from schemas.settings import Settings
from state import keys
from state.archive import ArchivedEvent, ArchiveWriter
from state.connection import claim_state_shards, connect
from state.registry import DefinitionRegistry, ProjectCache, Registry
from state.store import BatchOutcome, ProjectBatch, RedisLostWrites, StateStore
from state.stream import Stream
from state.topics import end_offsets, ensure_topics, topic_id

log = logging.getLogger("insightflow.dataflow")

APPLY_CHUNK = 2000  # events of one project per apply call (a few ms of Redis time)
QUEUED_CHUNKS = 16  # chunks planned ahead of the one Redis is applying


def _record_id(topic_id: str, record: Record) -> str:
    return f"{topic_id}:{record.partition}:{record.offset}"


@dataclass
class _Chunk:
    """One chunk of a batch on its way into Redis: the events per project still to apply, what
    earlier attempts learned (uuids applied already from another copy, shard fences of a replay,
    parts applied), the persons' properties before it, the parts planned last, the guards decided
    for it, and where the counted copies go."""

    pending: dict[int, list[Occurrence]]
    counted: dict[int, list[tuple[str, int, int, int]]]
    batches: list[ProjectBatch] = field(default_factory=list)
    skip: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    fences: dict[int, dict[int, dict[int, int]]] = field(default_factory=lambda: defaultdict(dict))
    home_done: set[int] = field(default_factory=set)
    shards_done: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    persons: dict[int, dict[int, PersonProperties]] = field(default_factory=lambda: defaultdict(dict))
    guards: dict[int, np.ndarray] = field(default_factory=dict)  # per project, the guards decided (`take_guards`)

    def __post_init__(self) -> None:
        self.pending = dict(self.pending)


class _Applier:
    """Applies planned chunks on one thread, in the order they were planned, while the worker parses
    and plans what comes behind them: Redis and the worker's Python then work at the same time,
    across batches, not one chunk at a time. `apply` takes a chunk all the way in (refused parts
    planned again, Redis being away waited out) before the thread takes the next one: a later chunk
    must never reach a state shard before an earlier one, whose events the shard's fence would then
    pass over as held. After a chunk fails otherwise, every chunk behind it fails too."""

    def __init__(self, apply: Callable[[_Chunk], None]) -> None:
        self.apply = apply
        self.queue: deque[Future[None]] = deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="apply")
        self._failed: BaseException | None = None

    def submit(self, chunk: _Chunk) -> Future[None]:
        self.queue.append(future := self._pool.submit(self._run, chunk))
        return future

    def _run(self, chunk: _Chunk) -> None:
        if self._failed is not None:
            raise RuntimeError("an earlier chunk could not be applied") from self._failed
        try:
            self.apply(chunk)
        except BaseException as exc:
            self._failed = exc
            log.exception("a chunk could not be applied")
            raise

    def wait_below(self, queued: int) -> None:
        """Wait until fewer than `queued` chunks are waiting or applying (0: until all are in),
        raising the failure of any that failed."""
        while self.queue and (len(self.queue) >= queued or self.queue[0].done()):
            self.queue.popleft().result()

    def settle(self) -> None:
        """Wait until the thread is idle, whatever the outcome (before a batch is written again)."""
        wait(self.queue)
        self.queue.clear()

    def close(self) -> None:
        self.wait_below(0)
        self._pool.shutdown()


class _StatePartition(StatelessSinkPartition[Parsed]):
    """Applies parsed records to Redis. No record can stop it: whatever one event makes impossible is
    dead-lettered with the reason, and a definition that cannot keep its state is marked failed.
    Redis being away is waited out; the broker being away restarts the dataflow (with backoff)."""

    def __init__(self, settings: Settings, worker: int = 0, workers: int = 1) -> None:
        self.settings = settings
        self.alone = workers == 1  # no other worker can merge persons behind this one's back
        self.client = client = connect(settings.redis_url)
        wait_for_redis(client, "state sink")
        self.store = StateStore(client, claim_state_shards(client, settings.state_shards))
        self.projects = ProjectCache(Registry(client))
        self.registry = DefinitionRegistry(client)
        self.definitions = DefinitionCache(self.registry)
        self.topic_id = topic_id(settings.kafka_bootstrap, settings.topic)
        self.tag = keys.topic_tag(self.topic_id)
        self.stream = Stream(client, settings.topic)
        # A recreated topic: its end offsets replace the old topic's in the reset's own write (read
        # before it, so lag never reads 0 meanwhile), and are read again after it: what capture
        # acknowledged between the two was recorded under the old offsets, which the reset forgot.
        recreated = self.stream.progress().topic_id not in (None, self.topic_id)
        if self.stream.reset(self.topic_id, end_offsets(settings.kafka_bootstrap, settings.topic) if recreated else {}):
            log.warning("the events topic %s is new (id %s): it replaced one whose events are gone (a broker that "
                        "lost its topics, or a topic recreated by hand); ingestion reads it from its start, and new "
                        "definitions read earlier history from the archive in %s", settings.topic, self.topic_id,
                        settings.archive_dir)
            self.stream.record({}, end_offsets(settings.kafka_bootstrap, settings.topic))
        self.dead = DeadLetters(settings.kafka_bootstrap, settings.dlq_topic, self.stream)
        self.recorded: dict[int, int] = {}  # partition -> next offset this process recorded as applied
        self.persons: dict[int, KnownPersons] = defaultdict(KnownPersons)  # per project
        self.firsts: dict[int, KnownFirsts] = defaultdict(KnownFirsts)
        self.archive = (ArchiveWriter(settings.archive_dir, worker, background=True)  # '': off
                        if settings.archive_dir else None)
        self.applier = _Applier(self._apply)
        self.recorder = ThreadPoolExecutor(1, thread_name_prefix="record")
        self._recording: Future[None] | None = None

    def write_batch(self, items: list[Parsed]) -> None:
        while True:
            try:
                self._check_writes_kept()
                self._write(items)
                return
            except REDIS_DOWN as exc:
                log.warning("Redis went away while applying a batch (%s)", exc)
                self.applier.settle()  # the batch is written again once the apply thread is idle
                wait_for_redis(self.client, "state sink")

    def _check_writes_kept(self) -> None:
        """Before each batch: if Redis lost writes this process made (it restarted from an append-only
        file that missed them: a machine crash between syncs, or an older copy), restart, so the source
        resumes from the offsets Redis has and nothing is missing. Redis clients reconnect by
        themselves, so a restart is not always seen as an error: the offsets are what tells."""
        recorded = dict(self.recorded)  # before reading Redis: the record thread raises both meanwhile
        if not recorded:
            return
        held = self.stream.applied_offsets(self.topic_id) or {}
        behind = {p: (held.get(p, 0), mine) for p, mine in recorded.items() if held.get(p, 0) < mine}
        if behind:
            raise RedisLostWrites(f"Redis came back without applied offsets this process wrote "
                                  f"(partition: (Redis, ours) {behind}); restarting to re-apply from Redis's")

    def _write(self, items: list[Parsed]) -> None:
        by_project: dict[int, list[Occurrence]] = defaultdict(list)
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
            try:  # everything the event alone decides: buckets, person update
                buckets = trend_buckets(event, zone(project.timezone))
                by_project[project.id].append(Occurrence.of(event, buckets.hour, buckets.day, rec.partition,
                                                            rec.offset))
            except Exception as exc:
                dead(rec, f"cannot be applied: {type(exc).__name__}: {exc}")
        # What the batch shows is behind it is known now, not only once it is applied: a backlog's
        # batch takes seconds, and the lag read meanwhile (`/readyz`, and summaries, which wait a
        # backlog out) would otherwise miss it.
        self.stream.record({}, ends)
        counted: dict[int, list[tuple[str, int, int, int]]] = defaultdict(list)
        longest = max((len(o) for o in by_project.values()), default=0)
        # Bounded script calls (Redis serves queries between), applied in order by one thread while
        # this one plans the chunks behind and goes on to the next batch, so Python and Redis work at
        # the same time. Planning reads nothing from Redis then (a read would wait behind the scripts
        # running there): persons are resolved and definitions read for the whole batch first. A
        # batch with identity links waits for the chunks before it, so no merge is recorded while
        # events of the merged persons are still on their way in. Definitions reading person
        # properties see those the previous chunk set, so with them a chunk is planned after the
        # previous one is in.
        if any(o.update.link_kind for occurrences in by_project.values() for o in occurrences):
            self.applier.wait_below(0)
        self._resolve(by_project)
        current = self.definitions.current(list(by_project))
        overlap = not any(d.uses_person for _, definitions in current.values() for d in definitions.values())
        chunks = []
        for start in range(0, longest, APPLY_CHUNK):
            part = {pid: o[start:start + APPLY_CHUNK] for pid, o in by_project.items() if len(o) > start}
            chunk = _Chunk(part, counted)
            self.applier.wait_below(QUEUED_CHUNKS if overlap else 0)
            chunk.batches = self._plan(chunk, current)
            chunks.append(self.applier.submit(chunk))
        # Once its chunks are in, the batch's archive rows, dead letters and applied offsets go in on
        # a thread of their own; one batch at a time, in order, so the offsets recorded never pass
        # events not applied or not archived.
        self._await_record()
        self._recording = self.recorder.submit(self._record, chunks, by_project, counted, list(letters.values()),
                                               applied)

    def _record(self, chunks: list[Future[None]], by_project: dict[int, list[Occurrence]],
                counted: dict[int, list[tuple[str, int, int, int]]], letters: list[Letter],
                applied: dict[int, int]) -> None:
        """Once a batch's chunks are applied: its events into the archive, its dead letters out, then
        its offsets recorded applied (last: what is recorded applied is archived too). Each step is
        harmless to repeat, so Redis being away is waited out and the batch's steps taken again."""
        for chunk in chunks:
            chunk.result()
        while True:
            try:
                self._archive(by_project, counted)
                self.dead.send(letters)
                self.stream.record(applied, {})  # the batch's ends: recorded when it arrived (`_write`)
                break
            except REDIS_DOWN as exc:
                log.warning("Redis went away while recording a batch (%s)", exc)
                wait_for_redis(self.client, "state sink")
        for partition, offset in applied.items():
            self.recorded[partition] = max(self.recorded.get(partition, 0), offset)

    def _await_record(self) -> None:
        """Wait for the previous batch's record; a failure other than Redis being away stops the
        dataflow here (it resumes from the offsets recorded)."""
        if self._recording is not None:
            recording, self._recording = self._recording, None
            recording.result()

    def _resolve(self, by_project: dict[int, list[Occurrence]]) -> None:
        """Give every event its person: from the worker's map, or from Redis for new distinct ids and
        identity links (in event order, before anything of the batch is counted, so every event of
        the batch counts under the person its links leave)."""
        if not self.alone:  # where the merge log stands before this worker learns a project's persons
            unread = {pid: None for pid in by_project if self.persons[pid].merges_read is None}
            for pid, (length, _) in self.store.merges_after(unread).items():
                self.persons[pid].merges_read = length
        asks = {}
        for pid, occurrences in by_project.items():
            known = self.persons[pid]
            known.trim()
            person_of = known.get
            ask = []
            for o in occurrences:
                o.person = person_of(o.distinct_id)
                if o.person is None or o.update.link_kind:
                    ask.append((o.uuid, o.distinct_id, o.update.link_kind or "", o.update.other_distinct_id or ""))
            if ask:
                asks[pid] = ask
        # Looked up again after Redis answered: the events it was asked about, those of every distinct
        # id it touched (a link moves ids from one person to another), and every event of a project
        # where persons were merged. None: applied already, nothing to count.
        touched: dict[int, set[str]] = {}
        merged: set[int] = set()
        for pid, resolved in self.store.resolve_persons(asks).items():
            self.persons[pid].learn(resolved.persons, resolved.merges)
            touched[pid] = set(resolved.persons)
            if resolved.merges:
                merged.add(pid)
        if not self.alone:  # persons another worker merged meanwhile: their ids belong to the survivor
            read = {pid: self.persons[pid].merges_read for pid in by_project}
            for pid, (length, merges) in self.store.merges_after(read).items():
                self.persons[pid].learn({}, merges)  # this worker's own again too: harmless, in order
                self.persons[pid].merges_read = length
                if merges:
                    merged.add(pid)
        for pid, occurrences in by_project.items():
            person_of = self.persons[pid].get
            if pid in merged:
                for o in occurrences:
                    o.person = person_of(o.distinct_id)
            elif pid in touched:
                ids = touched[pid]
                for o in occurrences:
                    if o.person is None or o.update.link_kind or o.distinct_id in ids:
                        o.person = person_of(o.distinct_id)

    def _archive(self, by_project: dict[int, list[Occurrence]],
                 counted: dict[int, list[tuple[str, int, int, int]]]) -> None:
        """Append the events state counted from these copies to the archive (those below the
        archive's fence are in already: a replay after a crash), and raise its fences to the batch."""
        if self.archive is None:
            return
        for pid, occurrences in by_project.items():
            at = {(o.partition, o.offset): o for o in occurrences}
            last: dict[int, int] = {}  # partition -> the batch's last offset of the project there
            for partition, offset in at:
                if last.get(partition, -1) < offset:
                    last[partition] = offset
            fences = {p: self.archive.fence(pid, self.tag, p) for p in last}
            events = [ArchivedEvent(self.tag, partition, offset, person, (o := at[(partition, offset)]).day, o.source)
                      for _, partition, offset, person in counted.get(pid, ()) if offset >= fences[partition]]
            self.archive.append(pid, events, {keys.partition_fence(self.tag, p): top + 1 for p, top in last.items()})

    def _plan(self, chunk: _Chunk, current: dict[int, tuple[int, dict[str, Definition]]] | None = None
              ) -> list[ProjectBatch]:
        """Plan each pending project's part of the chunk against its definitions: `current` as read
        for the batch, or read now. Outdated ones are refused by the shards and planned again."""
        now = datetime.now(UTC)
        batches = []
        if current is None:
            current = self.definitions.current(list(chunk.pending))
        for pid, (generation, definitions) in current.items():
            if pid not in chunk.pending:
                continue
            while True:  # until no event is counted already from another copy (`take_guards`)
                flags, failed = contributions(self.client, pid, definitions, chunk.pending[pid], now,
                                              chunk.skip.get(pid), chunk.persons[pid])
                for h, reason in failed.items():
                    self._fail(pid, h, reason)
                effects = batch_effects(chunk.pending[pid], self.firsts[pid], chunk.skip.get(pid), flags,
                                        self.store.shards, chunk.fences.get(pid))
                batch = ProjectBatch(pid, effects, generation, self.tag, pid in chunk.home_done,
                                     chunk.shards_done[pid])
                if batch.home_done:
                    break
                repeated = self.store.take_guards(batch, chunk.guards.get(pid))
                if not repeated:
                    chunk.guards[pid] = batch.guards
                    break
                chunk.skip[pid] |= repeated
            batches.append(batch.encode())
        return batches

    def _apply(self, chunk: _Chunk) -> None:
        """Apply a chunk (on the apply thread), waiting Redis out: parts applied before it went away
        are held by their guards and fences, so the chunk is simply applied again."""
        while True:
            try:
                self._finish(chunk, self.store.apply(chunk.batches))
                return
            except REDIS_DOWN as exc:
                log.warning("Redis went away while applying a chunk (%s)", exc)
                wait_for_redis(self.client, "state sink")

    def _finish(self, chunk: _Chunk, outcome: BatchOutcome) -> None:
        """Take the outcome of a chunk's apply, then plan again and apply what was refused until every
        part is in. A part refused (events applied already from another copy, definitions that moved
        meanwhile, events a shard holds already after a replay) wrote nothing; parts applied stay
        applied. The copies whose guards the home part took (the events counted) go to
        `chunk.counted` per project; definitions whose state Redis refused are failed."""
        for attempt in range(50):
            for (project_id, h), reason in outcome.applied.failed.items():
                self._fail(project_id, h, f"Redis refused its state: {reason}")
            for batch in chunk.batches:
                pid = batch.project_id
                if pid in outcome.repeated:
                    chunk.skip[pid] |= outcome.repeated[pid]
                    if batch.guards is not None:  # less what other workers counted
                        chunk.guards[pid] = batch.guards
                    continue
                if pid not in chunk.home_done:
                    chunk.counted[pid].extend(batch.effects.guards)
                chunk.home_done.add(pid)
                chunk.shards_done[pid] |= outcome.shards.get(pid, set())
                if outcome.finished(batch):
                    self.firsts[pid].learn(batch.effects.firsts)
                    del chunk.pending[pid]
                    continue
                if pid in outcome.stale:
                    log.info("definitions of project %s changed while planning a batch (attempt %d)", pid, attempt + 1)
                for shard, held in outcome.held.get(pid, {}).items():
                    log.info("state shard %s of project %s holds part of a replayed batch: %s", shard, pid, held)
                    chunk.fences[pid][shard] = held
            if not chunk.pending:
                return
            chunk.batches = self._plan(chunk)
            outcome = self.store.apply(chunk.batches)
        raise RuntimeError("a batch could not be applied: its definitions kept changing")

    def _fail(self, project_id: int, h: str, reason: str) -> None:
        fail_definition(self.registry, project_id, h, reason)

    def close(self) -> None:
        self.applier.close()
        self._await_record()
        self.recorder.shutdown()
        if self.archive is not None:
            self.archive.close()
        self.dead.close()


class StateSink(DynamicSink[Parsed]):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StatePartition:
        return _StatePartition(self.settings, worker_index, worker_count)


def _applied_offsets(settings: Settings, topic_id: str) -> dict[int, int] | None:
    client = connect(settings.redis_url)
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
