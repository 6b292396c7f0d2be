"""Registered definitions in the dataflow: contributions on the live path, and backfills from history.

Live: the sink asks which definitions a project has (refreshed each second), acknowledges the ones
it has not seen, and from then on adds each event's contribution to the same atomic apply call.
Backfill: a second input reads each partition from its start up to the offset live had applied
when every live worker had acknowledged the definition; the apply script's fences make sure each
offset is counted by exactly one of the two (see `state/store.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import redis
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Consumer, TopicPartition

from dataflows.operators.batch import DefinitionSums, Occurrence
from dataflows.operators.history import KeptHistory, history_kept, history_sums
from dataflows.operators.history_summaries import KeptColumns, Summarised, by_columns
from dataflows.operators.persons import PersonProperties
from dataflows.operators.trends import trend_buckets
from dataflows.services import REDIS_DOWN, DeadLetters, wait_for_redis
from dataflows.summariser import Summariser
from schemas.dates import zone
from schemas.definitions import Definition
from schemas.events import InvalidEvent, Record, TopicEvent, parse_topic_event
from schemas.registered import load_definition
from schemas.settings import Settings
from state import keys
from state.archive import HOT_PROPERTIES, Archive, contiguous, iter_events, partition_rows
from state.connection import claim_state_shards, connect
from state.records import read_property_stamp
from state.registry import DefinitionRegistry, ProjectCache, Registry
from state.store import Applied, BackfillRow, FenceMoved, StateStore
from state.stream import Stream
from state.summaries import SummaryStore
from state.topics import partition_count, topic_id

log = logging.getLogger("insightflow.definitions")
HOT = set(HOT_PROPERTIES)
ARCHIVE_CHUNK = 2000  # archived events per backfill item batch
# Archived events evaluated over columns per call (`Settings.backfill_chunk`): summed, or whole persons
# for a definition written person by person, a few hundred ms of Lua each; a fifth of it for a funnel or
# paths that keep their events per day (each event written out, not summed).
KEPT_SHARE = 5
SUMMARY_SLICE = 25_000  # backfilled persons whose summaries one sink call writes (about half a second)
PEOPLE_TTL_S = 60.0  # how long a backfill reuses the person properties it read (see `_people_of`)


def _by_columns(definition: Any) -> bool:
    """Whether a backfill evaluates the definition over the archive's columns (history.py): every
    definition (those reading person properties with a snapshot of them) but a funnel's correlation
    over property events, whose contribution reads every property (it goes event by event)."""
    return not getattr(definition, "property_events", False)


def _by_persons(definition: Any) -> bool:
    """Whether a backfill writes the definition's archived history person by person: one that keeps
    events per person only (ordered funnels not broken down, paths: flags 's'). A topic partition's
    archived events are taken by person, in chunks of whole persons, so every person gets them in one
    append (backfill_persons.lua), instead of one append per person and chunk of events; the fence
    moves with the last chunk."""
    return not isinstance(definition, Definition) and definition.flags == "s"


def fail_definition(registry: DefinitionRegistry, project_id: int, h: str, reason: str) -> None:
    """Stop keeping a definition (its requests answer the reason), saying so once in the log."""
    if registry.fail(project_id, h, reason):
        log.error("definition %s of project %s failed and is no longer kept: %s", h, project_id, reason)


class DefinitionCache:
    """Each project's definitions, reloaded when its definitions generation moves.

    The generation is read once per batch; the apply script re-checks it atomically, so a batch
    planned just before a registration is refused and planned again (`BatchOutcome.stale`).
    """

    def __init__(self, registry: DefinitionRegistry) -> None:
        self.registry = registry
        self._defs: dict[int, tuple[int, dict[str, Definition]]] = {}

    def current(self, project_ids: list[int]) -> dict[int, tuple[int, dict[str, Definition]]]:
        out = {}
        for project_id, generation in self.registry.generations(project_ids).items():
            cached = self._defs.get(project_id)
            if cached is None or cached[0] != generation:
                known = cached[1] if cached else {}
                fresh = {}
                for h, raw in self.registry.for_project(project_id).items():
                    try:
                        fresh[h] = known.get(h) or load_definition(raw)
                    except Exception as exc:  # stored by an older version, or beyond today's limits
                        self.registry.fail(project_id, h, f"its stored definition cannot be used: {exc}")
                        log.error("definition %s of project %s cannot be loaded: %s", h, project_id, exc)
                cached = (generation, fresh)
                self._defs[project_id] = cached
            out[project_id] = cached
        return out


def person_snapshot(client: redis.Redis, project_id: int, distinct_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Current person properties by distinct_id (person properties as of processing time)."""
    ids = list(dict.fromkeys(distinct_ids))
    if not ids:
        return {}
    found = {d: int(p) for d, p in zip(ids, client.hmget(keys.distinct_ids(project_id), ids), strict=True)
             if p is not None}
    states = person_states(client, project_id, found.values(), times=False)  # when each changed: not needed
    return {d: states[found[d]].values if d in found else {} for d in ids}


def person_states(client: redis.Redis, project_id: int, persons: Iterable[int], times: bool = True
                  ) -> dict[int, PersonProperties]:
    """Persons' properties with the time each last changed (`times`), as Redis holds them now."""
    ids = list(dict.fromkeys(persons))
    pipe = client.pipeline(transaction=False)
    for person in ids:
        pipe.hgetall(keys.person_properties(project_id, str(person)))
        if times:
            pipe.hgetall(keys.person_property_times(project_id, str(person)))
    got = pipe.execute() if ids else []
    step = 2 if times else 1
    return {person: PersonProperties({k.decode(): orjson.loads(v) for k, v in values.items()},
                                     {k.decode(): read_property_stamp(v) for k, v in stamps.items()})
            for person, values, stamps in zip(ids, got[::step], got[1::2] if times else [{}] * len(ids),
                                              strict=True)}


def _values(properties: dict[str, Any], keys: tuple[str, ...]) -> bytes | None:
    """The values of `keys` as one hashable text (JSON tells 1, 1.0 and true apart; a missing property
    reads as null, as the filters read it); None when they cannot be encoded (evaluated each time)."""
    try:
        return orjson.dumps([properties.get(k) for k in keys])
    except orjson.JSONEncodeError:
        return None


def contributions(client: redis.Redis, project_id: int, definitions: dict[str, Definition],
                  items: list[Occurrence], now: datetime, skip: set[str] | None = None,
                  before: dict[int, PersonProperties] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Fill each item's contributions (`skip`: uuids applied already, as `batch_effects` takes it);
    returns the flags of the definitions involved, and the definitions that raised on an event
    (hash -> reason): those contribute nothing to this batch and are to be failed, while the event
    still counts everywhere else. `before` keeps the persons as they were before the batch, read
    from Redis on the first call: planned again after its home part was applied (a shard refused
    part of it), the batch must not see its own updates as if made before it."""
    if not definitions:
        return {}, {}
    active = list(definitions.items())
    failed: dict[str, str] = {}
    uses_person = any(d.uses_person for d in definitions.values())
    states: dict[int, PersonProperties] = {}
    if uses_person:
        before = {} if before is None else before
        missing = {i.person for i in items if i.person is not None and i.person not in before}
        before.update(person_states(client, project_id, missing))
        states = {p: PersonProperties(dict(s.values), dict(s.stamps)) for p, s in before.items()}
    nobody: dict[str, Any] = {}
    taken: set[str] = set()
    # A definition whose contribution reads only the event's name and a few properties (`columnar`)
    # is evaluated once per distinct (name, values) of the call, as a backfill does (history.py).
    reads = {h: tuple(sorted(d.event_keys())) for h, d in active if d.columnar}
    names = {h: None if (n := d.event_names()) is None else frozenset(n) for h, d in active}
    evaluated: dict[tuple[str, str, bytes], tuple[str, Any] | None] = {}
    for item in items:
        event = item.source
        inputs: dict[tuple[str, ...], bytes | None] = {}
        person = nobody
        # Only then does any definition read the person, as the event leaves it: by the person the
        # batch's links leave (so a $set through one of its distinct ids reaches the others), with
        # updates applied in event-time order as Redis applies them (persons.lua). An event applied
        # already (no person, in `skip`, or a second copy in the batch) counts for nothing and
        # changes no one: Redis ignores its update too.
        if uses_person and item.person is not None and item.uuid not in taken and not (skip and item.uuid in skip):
            taken.add(item.uuid)
            state = states[item.person]
            state.apply(item.update, item.ts)
            person = state.values
        found = []
        for h, definition in active:
            if (failed and h in failed) or ((wanted := names[h]) is not None and event.event not in wanted):
                continue
            seen = None
            keys = reads.get(h)
            if keys is not None:
                values = inputs.get(keys, b"")
                if values == b"":
                    values = inputs[keys] = _values(event.properties, keys)
                if values is not None:
                    seen = (h, event.event, values)
                    if seen in evaluated:
                        hit = evaluated[seen]
                        if hit is not None:
                            found.append((h, hit[0], hit[1]))
                        continue
            try:
                hit = definition.contribution(event.event, event.properties, person, now)
                if hit is not None:
                    orjson.dumps(hit)  # what the apply script will be given must encode
            except Exception as exc:
                failed[h] = f"event {event.uuid} could not be applied to it: {type(exc).__name__}: {exc}"
                continue
            if seen is not None:
                evaluated[seen] = hit
            if hit is not None:
                found.append((h, hit[0], hit[1]))
        item.contributions = found or None
    if failed:
        for item in items:
            if item.contributions:
                item.contributions = [c for c in item.contributions if c[0] not in failed] or None
    return {h: d.flags for h, d in active if h not in failed}, failed


# --- backfill --------------------------------------------------------------------------------------

@dataclass
class BackfillItem:
    """One offset of topic partition `name` (`tag:partition`) for a definition's backfill: from the
    archive with the person live counted it for, or from the topic (`person` None: its uuid guard
    tells whether it is the copy live counted); `event` None only moves the backfill's fence."""

    project_id: int
    h: str
    name: str
    record: Record
    event: TopicEvent | None
    person: int | None = None


@dataclass
class ArchivedSums:
    """Archived events of topic partition `name` for the backfill of a definition evaluated over
    columns, applied in one go by the sink (dataflows/operators/history.py: summed for a counting
    definition, written out per day and person for a funnel or paths); the fence moves to `through`."""

    project_id: int
    h: str
    name: str
    table: pa.Table
    through: int
    final: bool = True  # the task's last chunk (a definition written person by person moves its fence only then)


@dataclass
class _ArchivedChunk:
    """A chunk of archived events evaluated for a definition: per state shard the fence and limit its
    write expects, what it adds, and (written on the sink's writer thread) that write."""

    item: ArchivedSums
    definition: Any
    limits: dict[int, tuple[int, int]]
    sums: dict[int, DefinitionSums] | dict[int, KeptHistory]
    started: float
    evaluated: float
    write: Future[Applied] | None = None

    @property
    def key(self) -> tuple[int, str, str]:
        return self.item.project_id, self.item.h, self.item.name


@dataclass
class SummaryWork:
    """Summarise a batch of a definition's dirty persons (attempt summaries, state/summaries.py)."""

    project_id: int
    h: str


@dataclass
class _Summarising:
    """A backfill's summaries computed over columns, written a slice of persons per sink call."""

    summarised: Summarised
    sizes: dict[int, int]  # the bytes of kept events the backfill gave each person
    started: float
    next: int = 0  # the index in `summarised.persons` of the next person to write
    written: int = 0


@dataclass
class _Task:
    """One topic partition of a definition's backfill: the archived events below `archived_to`, then
    the topic from there up to `bound` (events of the current topic not archived yet)."""

    project_id: int
    h: str
    name: str
    partition: int
    bound: int
    names: int  # topic partitions the definition's backfill covers in all
    archived: pa.Table | None  # the archive's events of this partition still to hand out, by offset
    archived_to: int
    consumer: Consumer | None
    last_emitted: int
    columnar: int = 0  # archived events per `ArchivedSums` chunk (evaluated over columns); 0: event by event
    rows: np.ndarray | None = None  # columnar: `archived` is the definition's history, these its rows left
    row_persons: np.ndarray | None = None  # written person by person: the persons of `rows`, ascending


class _BackfillPartition(StatelessSourcePartition[BackfillItem | SummaryWork | ArchivedSums]):
    def __init__(self, settings: Settings, worker: int, workers: int) -> None:
        self.settings, self.worker, self.workers = settings, worker, workers
        self.client = connect(settings.redis_url)
        wait_for_redis(self.client, "backfill")
        self.registry = DefinitionRegistry(self.client, claim_state_shards(self.client, settings.state_shards))
        self.partitions = partition_count(settings.kafka_bootstrap, settings.topic)
        self.tag = keys.topic_tag(topic_id(settings.kafka_bootstrap, settings.topic))
        self.archive = Archive(settings.archive_dir) if settings.archive_dir else None  # '': off
        self.task: _Task | None = None
        self._read: tuple[tuple[int, str], dict[str, int], pa.Table] | None = None  # see `_history`
        self.summaries = SummaryStore(self.client)
        self._awake: datetime | None = None
        self._summaries_due = 0.0  # when an idle source next looks for summaries to hand out (monotonic)
        self.stream = Stream(self.client, settings.topic)
        self._waiting_lag: int | None = None  # the live lag ready summaries wait for (None: not waiting)

    def _sleep(self, seconds: float) -> list[BackfillItem]:
        self._awake = datetime.now(UTC) + timedelta(seconds=seconds)
        return []

    def _fail(self, project_id: int, h: str, reason: str) -> None:
        fail_definition(self.registry, project_id, h, reason)

    def _pick(self) -> _Task | None:
        """The next topic partition of a pending definition this worker builds (partition % workers):
        every partition of the current topic, and every partition of earlier topics (a broker that
        lost its topics, a topic recreated) that state holds events of, whose history is the archive."""
        for project_id, h in self.registry.pending():
            names = ({keys.partition_fence(self.tag, p) for p in range(self.partitions)}
                     | self.registry.applied_fences(project_id))
            done = self.registry.done(project_id, h)
            evaluated = self._columnar_definition(project_id, h)
            history: pa.Table | None = None
            if self.archive is None:
                fences: dict[str, int] = {}
            elif evaluated is not None:  # rows below these fences are all in `history`
                fences, history = self._history(project_id, h, evaluated)
            else:
                fences = self.archive.fences(project_id)
            if done and not names - done:
                # Every partition finished, but the step that marks the definition built did not land
                # (a crash between marking its last partition and that): take it now.
                if self.registry.partition_done(project_id, h, min(done), len(names)):
                    log.info("definition %s of project %s: every partition was backfilled before a restart; "
                             "marked built", h, project_id)
                continue
            for name in sorted(names - done):
                tag, _, part = name.rpartition(":")
                partition = int(part)
                if partition % self.workers != self.worker:
                    continue
                bound = max(self.registry.bounds(project_id, h, name))
                start = self.registry.fence(project_id, h, name) + 1
                kept = min(fences.get(name, 0), bound)
                if tag != self.tag and kept < bound:
                    self._fail(project_id, h, f"events of an earlier events topic (partition {partition}, offsets "
                               f"{kept} to {bound - 1}) are neither in the topic, which was recreated (a broker that "
                               "lost its topics, or a topic deleted by hand), nor in the archive, so a new definition "
                               "cannot be built from all of them; the always-on state still answers everything "
                               "that needs no registration")
                    break
                archived, rows = None, None
                if self.archive is not None and start < kept and history is not None:
                    archived, rows = history, partition_rows(history, tag, partition, start, kept)
                elif self.archive is not None and start < kept:
                    archived = self.archive.partition_events(project_id, tag, partition, start, kept)
                consumer = None
                topic_start = max(start, kept)
                if tag == self.tag and topic_start < bound:
                    consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap,
                                         "group.id": "insightflow-backfill", "enable.auto.commit": False,
                                         "queued.min.messages": 100_000})
                    low, _ = consumer.get_watermark_offsets(TopicPartition(self.settings.topic, partition), timeout=10)
                    if low > topic_start:
                        consumer.close()
                        self._fail(project_id, h, f"events of partition {partition} from offset {topic_start} to "
                                   f"{low - 1} left the topic (its retention) before they were archived, so a new "
                                   "definition cannot be built from all of them")
                        break
                    consumer.assign([TopicPartition(self.settings.topic, partition, topic_start)])
                found = len(rows) if rows is not None else archived.num_rows if archived is not None else 0
                log.info("backfill of %s for project %s: %s from %s to %s (%d archived events, then the topic from %s)",
                         h, project_id, name, start, bound, found, topic_start)
                size = self.settings.backfill_chunk
                chunk = 0 if evaluated is None else size if isinstance(evaluated, Definition) else size // KEPT_SHARE
                row_persons = None
                if evaluated is not None and _by_persons(evaluated) and rows is not None and archived is not None:
                    chunk = size  # each chunk whole persons: by person, then offset
                    persons = archived.column("person").to_numpy()[rows]
                    order = np.lexsort((archived.column("offset").to_numpy()[rows], persons))
                    rows, row_persons = rows[order], persons[order]
                return _Task(project_id, h, name, partition, bound, len(names), archived, kept, consumer, start - 1,
                             chunk, rows, row_persons)
        return None

    def _columnar_definition(self, project_id: int, h: str) -> Any:
        """The definition, if its archived events are evaluated over columns (history.py): a counting
        one (summed), or a `columnar` funnel or paths (their kept events written out)."""
        raw = self.registry.get(project_id, h)
        try:
            definition = load_definition(raw) if raw is not None else None
        except Exception:  # the sink fails it with the reason
            return None
        return definition if _by_columns(definition) else None

    def _history(self, project_id: int, h: str, definition: Any) -> tuple[dict[str, int], pa.Table]:
        """The archive's fences and the project's archived events a definition can use (its event
        names), read once for all its topic partitions (each is then cut from it in memory).
        The fences are read first, so every event below them is in the table."""
        if self._read is None or self._read[0] != (project_id, h):
            assert self.archive is not None
            fences = self.archive.fences(project_id)
            kept = [] if isinstance(definition, Definition) else ["uuid"]  # kept events name their uuid
            if definition.uses_person:
                kept.append("distinct_id")  # whose person properties it reads
            table = self.archive.definition_rows(project_id, definition.event_names(), definition.event_keys(),
                                                 ["topic", "partition", "offset", "person", "event", "timestamp",
                                                  *kept])
            self._read = ((project_id, h), fences, contiguous(table))
        return self._read[1], self._read[2]

    @staticmethod
    def _archived_sums(task: _Task) -> list[BackfillItem | SummaryWork | ArchivedSums]:
        """The next chunk of the task's archived events, evaluated over columns by the sink; the last
        one moves the fence to `archived_to` - 1 (below it the archive holds every event of the project)."""
        assert task.archived is not None and task.rows is not None
        size, by_persons = task.columnar, task.row_persons is not None
        if task.row_persons is not None:  # a chunk of whole persons
            if size < len(task.rows):
                size = int(np.searchsorted(task.row_persons, task.row_persons[size - 1], side="right"))
            task.row_persons = task.row_persons[size:]
        chunk = task.archived.take(pa.array(task.rows[:size]))
        task.rows = task.rows[size:]
        if not len(task.rows):
            task.archived, task.rows = None, None
        final = task.archived is None
        if final:
            through = task.archived_to - 1
        elif by_persons:
            through = task.last_emitted  # the fence moves with the last chunk only
        else:
            through = int(chunk.column("offset")[-1].as_py())
        task.last_emitted = through
        return [ArchivedSums(task.project_id, task.h, task.name, chunk, through, final)]

    @staticmethod
    def _archived(task: _Task) -> list[BackfillItem | SummaryWork]:
        """The next archived events of the task, and after the last one a mark at `archived_to` - 1:
        below it the archive holds every event of the project, so the fence moves there."""
        assert task.archived is not None
        chunk = task.archived.slice(0, ARCHIVE_CHUNK)
        task.archived = task.archived.slice(chunk.num_rows) if chunk.num_rows < task.archived.num_rows else None
        record = partial(Record, task.partition, high_watermark=task.archived_to, value=b"", timestamp_ms=None)
        out: list[BackfillItem | SummaryWork] = [
            BackfillItem(task.project_id, task.h, task.name, record(offset), event, person)
            for offset, person, event in zip(chunk.column("offset").to_pylist(), chunk.column("person").to_pylist(),
                                             iter_events(chunk, task.project_id), strict=True)]
        if task.archived is None and (not out or out[-1].record.offset < task.archived_to - 1):  # type: ignore[union-attr]
            out.append(BackfillItem(task.project_id, task.h, task.name, record(task.archived_to - 1), None))
        task.last_emitted = out[-1].record.offset  # type: ignore[union-attr]
        return out

    def _summaries(self) -> list[SummaryWork]:
        """Idle: hand out summaries to build (definitions summarising after their backfill, and ready
        ones whose persons moved since). Every worker does, each for its own share of the persons
        (person % workers, `Summariser`), so no two summarise one person; a worker hands out work only
        while a sample of the dirty persons holds some of its share, so one whose share is done does
        not spin on the others'. While the live input is a backlog behind (`summaries_wait_lag`),
        ready definitions wait: their queries summarise dirty persons themselves, exactly, meanwhile."""
        work = []
        backlog = self._backlog()
        for project_id, h in self.registry.summarised():
            status, _ = self.registry.status(project_id, h)
            if status not in ("summarising", "ready") or (status == "ready" and backlog):
                continue
            if not self.summaries.pending(project_id, h):
                if status == "summarising":  # every person summarised: the sink marks it ready
                    work.append(SummaryWork(project_id, h))
            elif self.workers == 1 or any(int(p) % self.workers == self.worker
                                          for p in self.summaries.dirty(project_id, h, 500)):
                work.append(SummaryWork(project_id, h))
        return work

    def _backlog(self) -> bool:
        """Whether the live input is more than `summaries_wait_lag` events behind (said in the log
        when summaries start and stop waiting for it)."""
        lag = self.stream.progress().lag()
        if lag > self.settings.summaries_wait_lag:
            if self._waiting_lag is None:
                log.info("summaries of ready definitions wait while the live input is %d events behind", lag)
            self._waiting_lag = lag
            return True
        if self._waiting_lag is not None:
            log.info("the live input caught up (%d events behind): summarising resumes", lag)
            self._waiting_lag = None
        return False

    def next_batch(self) -> list[BackfillItem | SummaryWork]:
        try:
            for _ in range(16):  # a finished task: pick the next one now, not on a later call
                out = self._next_batch()
                if out or self._awake is not None or self.task is not None:
                    return out
            return []
        except REDIS_DOWN as exc:
            log.warning("backfill: Redis went away (%s)", exc)
            wait_for_redis(self.client, "backfill")
            self._drop_task()  # picked again from the fence Redis has
            return []

    def _drop_task(self) -> None:
        if self.task is not None and self.task.consumer is not None:
            self.task.consumer.close()
        self.task = None

    def _next_batch(self) -> list[BackfillItem | SummaryWork]:
        self._awake = None
        if self.task is not None and self.registry.failure(self.task.project_id, self.task.h) is not None:
            log.info("backfill of %s for project %s stopped: the definition failed", self.task.h,
                     self.task.project_id)
            self._drop_task()
        if self.task is None:
            self.task = self._pick()
            if self.task is None:
                self._read = None  # every backfill is done: let its archived events go
                now = time.monotonic()
                if now >= self._summaries_due:
                    work = self._summaries()
                    if work:
                        return work  # and again on the next call, until none is left
                    self._summaries_due = now + 0.5  # nothing to summarise: look again in half a second
                return self._sleep(0.1)  # idle: a new definition starts within 0.1 s
        task = self.task
        if task.archived is not None:
            return self._archived_sums(task) if task.columnar else self._archived(task)
        if task.consumer is not None and task.last_emitted < task.bound - 1:
            out = []
            for message in task.consumer.consume(2000, timeout=0.05):
                if message.error():
                    continue
                offset = message.offset()
                if offset >= task.bound:
                    break
                kind, ts = message.timestamp()
                record = Record(task.partition, offset, task.bound, message.value() or b"", ts if kind else None)
                try:
                    event = parse_topic_event(record.value, record.timestamp_ms)
                except InvalidEvent:
                    event = None
                except Exception:
                    event = None
                out.append(BackfillItem(task.project_id, task.h, task.name, record, event))
                task.last_emitted = offset
            return out
        # Everything below the bound was emitted: finished once the sink's fence has caught up.
        if task.bound == 0 or self.registry.fence(task.project_id, task.h, task.name) >= task.last_emitted:
            if task.consumer is not None:
                task.consumer.close()
            if self.registry.partition_done(task.project_id, task.h, task.name, task.names):
                status, _ = self.registry.status(task.project_id, task.h)
                log.info("definition %s of project %s is %s", task.h, task.project_id,
                         "backfilled, its persons' summaries next" if status == "summarising" else "ready")
            self.task = None
            return []
        return self._sleep(0.05)

    def next_awake(self) -> datetime | None:
        return self._awake

    def close(self) -> None:
        if self.task is not None and self.task.consumer is not None:
            self.task.consumer.close()


class BackfillSource(DynamicSource[BackfillItem | SummaryWork]):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _BackfillPartition:
        return _BackfillPartition(self.settings, worker_index, worker_count)


class _BackfillSinkPartition(StatelessSinkPartition[BackfillItem | SummaryWork]):
    def __init__(self, settings: Settings, worker: int = 0, workers: int = 1) -> None:
        self.client = connect(settings.redis_url)
        wait_for_redis(self.client, "backfill sink")
        shards = claim_state_shards(self.client, settings.state_shards)
        self.store = StateStore(self.client, shards)
        self.dead = DeadLetters(settings.kafka_bootstrap, settings.dlq_topic, Stream(self.client, settings.topic))
        self.summariser = Summariser(SummaryStore(self.client, shards), self.dead.send, worker, workers)
        self.registry = DefinitionRegistry(self.client, shards)
        self.projects = ProjectCache(Registry(self.client))
        self._definitions: dict[tuple[int, str], Definition] = {}
        self._written: dict[tuple[int, str, int], int] = {}  # last offset this process wrote per backfill
        # Per definition backfilled from the archive: the kept events this process applied, as columns,
        # and the bytes each person got, summarised over columns once the backfill is done.
        self._kept: dict[tuple[int, str], tuple[list[KeptColumns], dict[int, int]]] = {}
        self._summarising: dict[tuple[int, str], _Summarising] = {}  # their summaries, being written
        self.tag = keys.topic_tag(topic_id(settings.kafka_bootstrap, settings.topic))
        # A chunk of archived events being written while the next is evaluated (`_sum_archived`), and
        # one whose write did not land, applied again before anything else.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backfill-writer")
        self._pending: _ArchivedChunk | None = None
        self._redo: ArchivedSums | None = None
        # The person properties a backfill reading them got: (project, definition), when, by distinct_id.
        self._people: tuple[tuple[int, str], float, dict[str, dict[str, Any]]] | None = None

    def _definition(self, project_id: int, h: str) -> Definition | None:
        """The definition, while it is kept (None once it failed or if it is unknown)."""
        if self.registry.failure(project_id, h) is not None:
            return None
        key = (project_id, h)
        if key not in self._definitions:
            raw = self.registry.get(project_id, h)
            if raw is None:
                return None
            try:
                self._definitions[key] = load_definition(raw)
            except Exception as exc:
                self._fail(project_id, h, f"its stored definition cannot be used: {exc}")
                return None
        return self._definitions[key]

    def _fail(self, project_id: int, h: str, reason: str) -> None:
        self._kept.pop((project_id, h), None)
        self._summarising.pop((project_id, h), None)
        fail_definition(self.registry, project_id, h, reason)

    def _summarise(self, work: SummaryWork) -> None:
        """Summarise a definition's persons: first those its backfill kept over columns, written
        `SUMMARY_SLICE` persons per call so the live input runs between slices, then (once they are
        all written) the dirty persons left, by the summariser."""
        definition = self._definition(work.project_id, work.h)
        key = (work.project_id, work.h)
        kept = self._kept.pop(key, None)
        if definition is None:
            self._summarising.pop(key, None)
            return
        if kept is not None and kept[0]:
            started = time.perf_counter()
            summarised = self.summariser.backfilled_summaries(definition, KeptColumns.concat(kept[0]))
            self._summarising[key] = _Summarising(summarised, kept[1], started)
        slices = self._summarising.get(key)
        if slices is not None:
            end = min(slices.next + SUMMARY_SLICE, len(slices.summarised.persons))
            slices.written += self.summariser.write_backfilled(definition, slices.summarised, slices.sizes,
                                                               slices.next, end)
            slices.next = end
            if end < len(slices.summarised.persons):
                return  # the next SummaryWork writes the next slice
            del self._summarising[key]
            log.info("definition %s of project %s: %d of its %d backfilled persons summarised over columns in %.1f s",
                     work.h, work.project_id, slices.written, len(slices.sizes), time.perf_counter() - slices.started)
        self.summariser.drain(definition)
        done = not self.summariser.pending(work.project_id, work.h)
        if done and self.registry.summaries_built(work.project_id, work.h):
            log.info("definition %s of project %s is ready (its persons are summarised)", work.h, work.project_id)

    def write_batch(self, items: list[BackfillItem | SummaryWork]) -> None:
        while True:
            try:
                self._write(items)
                return
            except REDIS_DOWN as exc:
                log.warning("backfill sink: Redis went away (%s)", exc)
                wait_for_redis(self.client, "backfill sink")

    def _write(self, items: list[BackfillItem | SummaryWork]) -> None:
        self._redo_archived()
        groups: dict[tuple[int, str, str], list[BackfillItem]] = {}
        for item in items:
            if not isinstance(item, ArchivedSums):
                self._settle()
            if isinstance(item, SummaryWork):
                self._summarise(item)
                continue
            if isinstance(item, ArchivedSums):
                self._sum_archived(item)
                continue
            groups.setdefault((item.project_id, item.h, item.name), []).append(item)
        now = datetime.now(UTC)
        for (project_id, h, name), group in groups.items():
            definition = self._definition(project_id, h)
            if definition is None:
                continue
            try:
                rows = self._rows(definition, project_id, group, now)
            except Exception as exc:
                self._fail(project_id, h, f"an event could not be applied to it: {type(exc).__name__}: {exc}")
                continue
            written = self._written.get((project_id, h, name), -1)
            result = self.store.backfill(definition, name, rows, written)
            for (pid, failed_h), reason in result.failed.items():
                self._fail(pid, failed_h, f"Redis refused its state: {reason}")
            self._written[(project_id, h, name)] = max(written, group[-1].record.offset)

    def _sum_archived(self, item: ArchivedSums) -> None:
        """Apply a chunk of archived events to a definition, evaluated over its columns, above
        each shard's fence and below its limit (bound and live handover): in one call per shard, or
        for a definition written person by person (`_by_persons`) in calls of a few thousand persons.
        A chunk followed by more of its task is written on the writer thread while the sink evaluates
        the next one (Redis runs the first chunk's scripts while Python sums the next); the next
        chunk's write waits for it and expects the fence it moved."""
        definition = self._definition(item.project_id, item.h)
        if definition is None:
            self._settle()
            self._kept.pop((item.project_id, item.h), None)  # failed or gone: nothing to summarise
            return
        key = (item.project_id, item.h, item.name)
        pending = self._pending
        if _by_persons(definition) or (pending is not None and pending.key != key):
            self._settle()
            self._apply_archived(definition, item)
            return
        chunk = self._evaluate_archived(definition, item)  # while the pending chunk's write runs
        if chunk is None:
            self._settle()
            return
        if not self._settle():
            self._apply_archived(definition, item)  # the fence is not the one evaluated against
            return
        if pending is not None:  # its write moved every shard's fence to its last offset
            chunk.limits = {s: (max(fence, pending.item.through), limit) for s, (fence, limit) in chunk.limits.items()}
        write = self.store.backfill_sums_write(definition, item.name, chunk.sums, chunk.limits, item.through,
                                               self._written.get(key, -1))  # encoded here, sent on the thread
        if not item.final:
            chunk.write = self._writer.submit(write)
            self._pending = chunk
            return
        try:  # the last chunk is written before the source looks at the fence to finish the task
            result = write()
        except FenceMoved as exc:
            log.info("%s: evaluating again", exc)
            self._apply_archived(definition, item)
            return
        self._applied_archived(chunk, result)

    def _evaluate_archived(self, definition: Any, item: ArchivedSums) -> _ArchivedChunk | None:
        """What a chunk adds to a definition above the fences read now (None: the definition failed)."""
        started = time.perf_counter()
        limits = self.store.backfill_limits(item.project_id, item.h, item.name)

        def takes(offsets: np.ndarray, shard: int, limits: dict[int, tuple[int, int]] = limits) -> np.ndarray:
            return (offsets > limits[shard][0]) & (offsets < limits[shard][1])

        people = None  # read before evaluating: Redis down is waited out, not a failed definition
        if definition.uses_person:
            people = self._people_of(item.project_id, item.h, item.table.column("distinct_id"))
        try:
            if isinstance(definition, Definition):
                sums = history_sums(definition, item.table, datetime.now(UTC), HOT, self.store.shards, takes, people)
            else:
                sums = history_kept(definition, item.table, datetime.now(UTC), HOT, self.store.shards, takes, people)
        except Exception as exc:
            self._fail(item.project_id, item.h, f"an event could not be applied to it: {type(exc).__name__}: {exc}")
            return None
        return _ArchivedChunk(item, definition, limits, sums, started, time.perf_counter())

    def _people_of(self, project_id: int, h: str, distinct_ids: pa.ChunkedArray) -> dict[str, dict[str, Any]]:
        """Current person properties of these distinct_ids, as the event-by-event backfill reads them:
        read once per definition's backfill (within `PEOPLE_TTL_S`), then only for distinct_ids not
        seen yet, since every chunk holds most of a project's persons again (200,000 of them: 2.5 s)."""
        now = time.monotonic()
        if self._people is None or self._people[0] != (project_id, h) or now - self._people[1] > PEOPLE_TTL_S:
            self._people = ((project_id, h), now, {})
        known = self._people[2]
        missing = [d for d in pc.unique(distinct_ids).to_pylist() if d not in known]
        known.update(person_snapshot(self.client, project_id, missing))
        return known

    def _apply_archived(self, definition: Any, item: ArchivedSums) -> None:
        """Evaluate and write a chunk now, evaluating again while a fence moved under it."""
        key = (item.project_id, item.h, item.name)
        per_person = _by_persons(definition)
        while True:
            chunk = self._evaluate_archived(definition, item)
            if chunk is None:
                return
            written = self._written.get(key, -1)
            try:
                if per_person:
                    progress = self.store.backfill_progress(item.project_id, item.h, item.name)
                    result = self.store.backfill_persons(
                        definition, item.name, {s: part.persons for s, part in chunk.sums.items()},  # type: ignore[union-attr]
                        chunk.limits, progress, item.through, written, last=item.final)
                    result.events = sum(part.events for part in chunk.sums.values())  # type: ignore[union-attr]
                else:
                    result = self.store.backfill_sums(definition, item.name, chunk.sums, chunk.limits, item.through,
                                                      written)
            except FenceMoved as exc:
                log.info("%s: evaluating again", exc)
                continue
            self._applied_archived(chunk, result)
            return

    def _settle(self) -> bool:
        """Wait for the chunk being written on the writer thread, if any, and record its outcome;
        one whose write did not land (a fence moved, Redis went away) is evaluated and written
        again now. False if it had to be."""
        chunk, self._pending = self._pending, None
        if chunk is None:
            return True
        assert chunk.write is not None
        try:
            result = chunk.write.result()
        except (FenceMoved, *REDIS_DOWN) as exc:
            log.info("%s: evaluating the chunk again", exc)
            self._redo = chunk.item
            self._redo_archived()
            return False
        self._applied_archived(chunk, result)
        return True

    def _redo_archived(self) -> None:
        """Apply a chunk whose write did not land (kept until it did, so a Redis outage meanwhile
        retries it with the batch)."""
        if self._redo is not None:
            definition = self._definition(self._redo.project_id, self._redo.h)
            if definition is not None:
                self._apply_archived(definition, self._redo)
            self._redo = None

    def _applied_archived(self, chunk: _ArchivedChunk, result: Applied) -> None:
        item = chunk.item
        for (pid, failed_h), reason in result.failed.items():
            self._fail(pid, failed_h, f"Redis refused its state: {reason}")
        if by_columns(chunk.definition) and not result.failed:
            self._keep_columns(item.project_id, item.h, chunk.sums.values())  # type: ignore[arg-type]
        key = (item.project_id, item.h, item.name)
        self._written[key] = max(self._written.get(key, -1), item.through)
        log.info("backfill of %s for project %s: %d archived events of %s evaluated by columns, %d applied (%.2f s "
                 "evaluating, %.2f s until written)", item.h, item.project_id, item.table.num_rows, item.name,
                 result.events, chunk.evaluated - chunk.started, time.perf_counter() - chunk.evaluated)

    def _keep_columns(self, project_id: int, h: str, parts: Iterable[KeptHistory]) -> None:
        columns, sizes = self._kept.setdefault((project_id, h), ([], {}))
        for part in parts:
            if part.columns is not None:
                columns.append(part.columns)
            for person, size in part.sizes.items():
                sizes[person] = sizes.get(person, 0) + size

    def _rows(self, definition: Definition, project_id: int, group: list[BackfillItem], now: datetime
              ) -> list[BackfillRow]:
        """Each item's contribution and buckets, with the person live counted it for: the archive's,
        or for events read from the topic the one their uuid guard names, if it is this copy."""
        ours = [i for i in group if i.event is not None and self._belongs(i.event, project_id)]
        snapshot: dict[str, dict[str, Any]] = {}
        if definition.uses_person and ours:
            snapshot = person_snapshot(self.client, project_id, (i.event.distinct_id for i in ours if i.event))
        tz = zone(definition.timezone)
        rows: list[BackfillRow] = []
        for item in group:
            event = item.event
            if event is None or not self._belongs(event, project_id):
                rows.append(BackfillRow(item.record.offset))
                continue
            hit = definition.contribution(event.event, event.properties, snapshot.get(event.distinct_id, {}), now)
            try:
                buckets = trend_buckets(event, tz)
            except (ValueError, OverflowError):  # the live path dead-lettered it: nothing to apply
                rows.append(BackfillRow(item.record.offset))
                continue
            rows.append(BackfillRow(item.record.offset, event, buckets.hour, buckets.day, hit, item.person))
        topic = [r for r, item in zip(rows, group, strict=True) if item.person is None and r.event is not None]
        if topic:
            tag, _, partition = group[0].name.rpartition(":")
            checked = {r.offset: r for r in self.store.counted_copies(project_id, tag, int(partition), topic)}
            rows = [checked.get(r.offset, replace(r, contribution=None)) if item.person is None and r.event
                    else r for r, item in zip(rows, group, strict=True)]
        return rows

    def _belongs(self, event: TopicEvent, project_id: int) -> bool:
        if event.project_id is not None:
            return event.project_id == project_id
        project = self.projects.by_token(event.token or "")
        return project is not None and project.id == project_id

    def close(self) -> None:
        try:
            self._settle()
        finally:
            self._writer.shutdown()
            self.dead.close()


class BackfillSink(DynamicSink[BackfillItem | SummaryWork]):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _BackfillSinkPartition:
        return _BackfillSinkPartition(self.settings, worker_index, worker_count)
