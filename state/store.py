"""Applying planned events to Redis: the only place the dataflow writes project state.

The worker sums a project's batch per key (dataflows/operators/batch.py). Its index of the project's
guard log (state/guards.py) tells which events were counted already: a batch holding an event applied
already from another copy (an SDK resend, an overlapping replay) writes nothing and is summed again
without it. One Lua call in the project's home (`apply_batch.lua`) appends the new events' guards,
only if the log holds exactly what the index read. Then one call per state shard applies what the
events add there (`apply_shard.lua`), with that shard's per-partition fence in the same call: a
replay of events a shard holds already is refused and summed again without them. So every event
counts once, after a crash at any point between the calls too, and counts may use HINCRBY
(ARCHITECTURE rule 2). Every other write is order-insensitive: set membership, minimum first-seen
time, and person properties ordered by event time rather than arrival.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import redis

from schemas.definitions import Definition
from schemas.events import TopicEvent
from state import keys, scripts
from state.connection import ShardedStore, run_scripts
from state.guards import GuardIndex
from state.reads import person_bitmap
from state.records import (
    GUARD_RECORD,
    NO_TOPIC,
    Copy,
    guard_keys,
    guard_records,
    kept_append_of_texts,
    kept_block,
    read_guards,
    read_legacy_guard,
    read_merge,
    tag_code,
)

if TYPE_CHECKING:  # the batch is summed by the dataflow's pure operator; only its shape is read here
    from dataflows.operators.batch import BatchEffects, DefinitionSums, ShardEffects
    from dataflows.operators.history import KeptHistory


@dataclass
class Applied:
    """What an apply call did: events newly applied, and definitions whose state Redis refused."""

    events: int = 0
    failed: dict[tuple[int, str], str] = field(default_factory=dict)  # (project, hash) -> reason


class FenceMoved(RuntimeError):
    """A backfill fence moved between reading it and writing what was summed above it (another
    worker's copy of the same task): read the fences again and sum again."""


class RedisLostWrites(RuntimeError):
    """Redis came back without writes this process made (it crashed between AOF syncs): the dataflow
    restarts so its sources resume from the offsets Redis has, and re-apply what was lost."""


def _failures(project_id: int, answer: list[object]) -> dict[tuple[int, str], str]:
    pairs = answer[1:]
    return {(project_id, _text(pairs[i])): _text(pairs[i + 1]) for i in range(0, len(pairs), 2)}


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def texts(persons: Iterable[int] | np.ndarray) -> list[str]:
    """Person ids as the text a script puts into keys and commands (see `home_args`)."""
    return list(map(str, persons.tolist() if isinstance(persons, np.ndarray) else persons))


def _json_values(values: dict[str, object]) -> str:
    """Encode each value once, here, so Lua stores PostHog's JSON text untouched."""
    if not values:
        return ""
    return orjson.dumps({str(k): orjson.dumps(v).decode() for k, v in values.items()}).decode()


def home_args(project_id: int, effects: BatchEffects) -> list[Any]:
    """The first arguments of `apply_batch.lua`: its prefix, and the home part of the batch as one
    JSON object of sections whose rows follow `scripts.HOME_SECTIONS` (the guards, decided while
    planning, follow: `StateStore.apply`). Whatever a script puts into a key or a command goes as
    text: Lua turns a number into text with `%.17g`, about 0.6 µs each, a few times per event
    (`docs/measured.md`)."""
    batch = {
        "N": sorted(effects.names),
        "U": [[o.person, o.ts, _json_values(o.update.set), _json_values(o.update.set_once),
               orjson.dumps(o.update.unset).decode() if o.update.unset else ""] for o in effects.updates],
        "O": [[partition, nxt] for partition, nxt in effects.reached.items()],
        "earliest": effects.earliest,
    }
    return [keys.project_prefix(project_id), orjson.dumps(batch)]


def shard_args(project_id: int, shard: int, generation: int, effects: ShardEffects, tag: str) -> list[Any]:
    """The arguments of `apply_shard.lua` for one state shard (rows follow `scripts.SHARD_SECTIONS`;
    fences are named `tag:partition`)."""
    bits = [["h", ev, str(hour), texts(persons)] for (ev, hour), persons in effects.hour_persons.items()]
    bits += [["d", ev, day, texts(persons)] for (ev, day), persons in effects.day_persons.items()]
    counts = [["h", ev, str(hour), str(n)] for (ev, hour), n in effects.hour_counts.items()]
    counts += [["d", ev, day, str(n)] for (ev, day), n in effects.day_counts.items()]
    batch = {
        "R": [[keys.partition_fence(tag, partition), first, nxt] for partition, (first, nxt) in effects.ranges.items()],
        "C": counts,
        "B": bits,
        "F": [[ev, [[str(p), ts, str(hour), day] for p, (ts, hour, day) in persons.items()]]
              for ev, persons in effects.firsts.items() if persons],
        "H": [[h, keys.partition_fence(tag, partition), offset]
              for (h, partition), offset in effects.handovers.items()],
        **definition_sections(effects.sums),
    }
    kept_rows, kept = kept_sections(((h, day, rows) for (h, day), rows in effects.kept_days.items()),
                                    effects.kept_persons.items())
    return [keys.shard_prefix(project_id, shard), generation, orjson.dumps(batch | kept_rows), kept]


def definition_sections(by_definition: dict[str, DefinitionSums], whole: Collection[tuple[str, str, Any]] = ()
                        ) -> dict[str, list[Any]]:
    """What counting definitions add, as the sections `definition_sums.lua` applies (rows follow
    `scripts.DEFINITION_SECTIONS`); the person sets of keys in `whole` are left out (a backfill sends
    them as bitmaps)."""
    items = by_definition.items()
    return {
        "DC": [[h, kind, bv, str(bucket), n, [] if key in whole else texts(sums.persons[key])]
               for h, sums in items for key, n in sums.counts.items() for kind, bv, bucket in (key,)],
        "DV": [[h, sorted(sums.breakdowns)] for h, sums in items if sums.breakdowns],
        "DS": [[h, bv, f, *stat] for h, sums in items for (bv, f), stat in sums.stats.items()],
        "DL": [[h, kind, bv, str(bucket), values] for h, sums in items
               for (kind, bv, bucket), values in sums.values.items()],
        "DA": [[h, kind, bv, str(bucket), [x for p, n in actors.items() for x in (str(p), n)]] for h, sums in items
               for (kind, bv, bucket), actors in sums.actors.items()],
    }


DENSE_BYTES_PER_PERSON = 32  # a backfill sends a person set whole once it has a person per 32 bytes of bitmap


def _dense(persons: set[int] | np.ndarray) -> bool:
    """Whether a backfill sends a person set as a bitmap."""
    if len(persons) < 2:
        return False
    largest = int(persons[-1]) if isinstance(persons, np.ndarray) else max(persons)  # an array is sorted
    return len(persons) * DENSE_BYTES_PER_PERSON > largest // 8


def kept_sections(days: Iterable[tuple[str, str, list[str]]], persons: Iterable[tuple[int, dict[str, list[str]]]]
                  ) -> tuple[dict[str, list[Any]], bytes]:
    """Events definitions keep, as the KD and KP sections `definition_sums.lua` applies: per
    (definition, day) the funnel rows; per person (its records by definition), the definitions and
    the length of its append to its kept log (`kept_append`'s form), the appends themselves back to
    back in the second value (the script's `kept` argument). One append per person, not per
    definition: appends were half of Redis's time per event. Raw bytes, not JSON strings: decoding
    half a megabyte of escaped JSON per batch was a quarter of Redis's time in `apply_shard.lua`."""
    rows, appends = [], []
    for person, by_definition in persons:
        data = kept_append_of_texts({h: "".join(kept) for h, kept in by_definition.items()})
        rows.append([str(person), len(data), list(by_definition)])
        appends.append(data)
    return {"KD": [[h, day, rows] for h, day, rows in days], "KP": rows}, b"".join(appends)


@dataclass(frozen=True, slots=True)
class BackfillRow:
    """One offset of a partition's history for a definition's backfill."""

    offset: int
    event: TopicEvent | None = None
    hour: int = 0
    day: str = ""
    contribution: tuple[str, float | None] | None = None
    person: int | None = None  # the person live counted it for (None: not the copy live counted)


@dataclass
class ProjectBatch:
    """One project's batch, summed (dataflows/operators/batch.py) against the definitions of
    `generation`, on the topic of `tag`. `home_done`: its home part was applied by an earlier
    attempt; `shards_done`: so were these shards' parts."""

    project_id: int
    effects: BatchEffects
    generation: int = 0
    tag: str = ""
    home_done: bool = False
    shards_done: set[int] = field(default_factory=set)
    guards: np.ndarray | None = None  # the guard records its home part appends (`StateStore.take_guards`)
    foreign_basis: int = 0  # other workers' guards the decision saw (`StateStore.take_guards`)
    _home_args: list[Any] | None = field(default=None, repr=False, compare=False)
    _shard_args: dict[int, list[Any]] = field(default_factory=dict, repr=False, compare=False)

    def home_args(self) -> list[Any]:
        if self._home_args is None:
            self._home_args = home_args(self.project_id, self.effects)
        return self._home_args

    def shard_args(self, shard: int) -> list[Any]:
        if shard not in self._shard_args:
            self._shard_args[shard] = shard_args(self.project_id, shard, self.generation, self.effects.shards[shard],
                                                 self.tag)
        return self._shard_args[shard]

    def encode(self) -> ProjectBatch:
        """Encode every part's arguments now (the planner does, so the thread that applies only sends)."""
        self.home_args()
        for shard in self.effects.shards:
            self.shard_args(shard)
        return self


@dataclass
class BatchOutcome:
    """What one apply did with each project. Home parts: applied (`home`), or refused because some
    events were applied already from another copy (`repeated`: plan again without them; nothing of
    that project was written). Shard parts, sent once the home part is in: applied (`shards`), or
    refused as planned with outdated definitions (`stale`: reload and plan again) or as holding
    events the shard has (`held`: shard -> partition -> next offset it holds; plan again without
    the events below). A refused part wrote nothing."""

    applied: Applied = field(default_factory=Applied)
    home: set[int] = field(default_factory=set)
    repeated: dict[int, set[str]] = field(default_factory=dict)
    shards: dict[int, set[int]] = field(default_factory=dict)
    stale: set[int] = field(default_factory=set)
    held: dict[int, dict[int, dict[int, int]]] = field(default_factory=dict)

    def finished(self, batch: ProjectBatch) -> bool:
        """Every part of the batch is applied."""
        pid = batch.project_id
        done = batch.shards_done | self.shards.get(pid, set())
        return (batch.home_done or pid in self.home) and set(batch.effects.shards) <= done


@dataclass
class Resolved:
    """Persons as `resolve_persons.lua` left them: every distinct id it was asked about that has a
    person, and the merges it made (merged person, the person it became), in order."""

    persons: dict[str, int] = field(default_factory=dict)
    merges: list[tuple[int, int]] = field(default_factory=list)


class StateStore(ShardedStore):
    """Redis-backed insight state for the dataflow."""

    def __init__(self, client: redis.Redis, shards: int | None = None) -> None:
        self.redis = client
        self._shards = shards
        self._apply = client.register_script(scripts.APPLY_BATCH.source)
        self._apply_shard = client.register_script(scripts.APPLY_SHARD.source)
        self._resolve = client.register_script(scripts.RESOLVE_PERSONS.source)
        self._backfill = client.register_script(scripts.BACKFILL_EVENTS.source)
        self._backfill_sums = client.register_script(scripts.BACKFILL_SUMS.source)
        self._backfill_persons = client.register_script(scripts.BACKFILL_PERSONS.source)
        self._guards: dict[int, GuardIndex] = {}
        self._guards_lock = threading.Lock()
        # Guards other workers appended that this one read since it loaded the log (into the index,
        # as logged): a batch planned before some of them is looked up again (`_counted_elsewhere`).
        self._foreign_count: dict[int, int] = defaultdict(int)

    def guard_index(self, project_id: int) -> GuardIndex:
        """The project's guard log as far as read, read once in full, and the guards planned since
        (`take_guards`); a project that counted events before the log existed also keeps the guards
        it took then (`GuardIndex.legacy`)."""
        with self._guards_lock:
            index = self._guards.get(project_id)
            if index is None:
                index = GuardIndex()
                self.read_guard_log(project_id, index)
                meta = keys.project_meta(project_id)
                index.legacy = self.redis.hget(meta, "legacy_guards") is not None
                if not index.known and not index.legacy and self.redis.exists(keys.project_applied(project_id)):
                    self.redis.hset(meta, "legacy_guards", 1)  # counted before the log: its guards are hashes
                    index.legacy = True
                self._guards[project_id] = index
            return index

    def read_guard_log(self, project_id: int, index: GuardIndex) -> int:
        """Add to `index` the records of the project's guard log past the `known` ones; answers how
        many were read."""
        width, per_segment = GUARD_RECORD.itemsize, keys.GUARD_SEGMENT_RECORDS
        start = index.known
        while True:
            segment, at = divmod(index.known, per_segment)
            raw = self.redis.getrange(keys.guard_log(project_id, segment), at * width, -1)
            records = read_guards(raw)
            index.add(records)
            index.known += len(records)
            if at + len(raw) // width < per_segment:
                return index.known - start

    def counted_from(self, project_id: int, uuids: list[str]) -> list[Copy | None]:
        """The copy each uuid was counted from (tag code, partition, offset, person), None if never."""
        found, copies, _ = self.counted_copies_of(project_id, uuids, guard_keys(uuids))
        held = copies[["tag", "partition", "offset", "person"]].tolist()
        return [copy if hit else None for hit, copy in zip(found.tolist(), held, strict=True)]

    def counted_copies_of(self, project_id: int, uuids: list[str], guard_keys: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`counted_from` as arrays (`GuardIndex.find`: guard records, and whether each is in the log
        or only planned), for the uuids and their `records.guard_keys`."""
        index = self.guard_index(project_id)
        found, copies, logged = index.find(guard_keys)
        missing = np.flatnonzero(~found).tolist() if index.legacy else []
        if missing:
            pipe = self.redis.pipeline(transaction=False)
            for i in missing:
                pipe.hget(keys.seen(project_id, keys.seen_bucket(uuids[i])), uuids[i])
            for i, held in zip(missing, pipe.execute(), strict=True):
                if held is not None:
                    found[i], copies[i], logged[i] = True, (guard_keys[i], *read_legacy_guard(held)), True
        return found, copies, logged

    def resolve_persons(self, asks: dict[int, list[tuple[str, str, str, str]]]) -> dict[int, Resolved]:
        """Per project, (uuid, distinct id, link kind or '', other distinct id or '') of events in batch
        order whose persons the worker cannot tell alone: creates persons for new distinct ids and
        applies identity links, skipping events already applied."""
        calls = []
        owners = []
        for project_id, items in asks.items():
            args: list[str | int] = [keys.project_prefix(project_id), len(items)]
            counted = self.counted_from(project_id, [uuid for uuid, _, _, _ in items])
            for (_, did, kind, other), copy in zip(items, counted, strict=True):
                args += ["" if copy is None else "1", did, kind, other]
            calls.append(([keys.distinct_ids(project_id)], args))
            owners.append(project_id)
        out: dict[int, Resolved] = {}
        for project_id, answer in zip(owners, run_scripts(self.redis, self._resolve, calls), strict=True):
            pairs = int(answer[0])
            flat = answer[1:]
            persons = {_text(flat[2 * i]): int(flat[2 * i + 1]) for i in range(pairs)}
            rest = flat[2 * pairs:]
            merges = [(int(rest[i]), int(rest[i + 1])) for i in range(0, len(rest), 2)]
            out[project_id] = Resolved(persons, merges)
        return out

    def _read_appended(self, project_id: int, held: int) -> None:
        """The guard log grew past what this process knew (`held`: bytes in the segment it reads):
        read what other workers appended into the index."""
        index = self.guard_index(project_id)
        if held < index.known % keys.GUARD_SEGMENT_RECORDS * GUARD_RECORD.itemsize:
            raise RedisLostWrites(f"the guard log of project {project_id} is shorter than this process read it")
        read = self.read_guard_log(project_id, index)  # into the index before the count: a plan
        self._foreign_count[project_id] += read  # reading the count sees them

    def _counted_elsewhere(self, batch: ProjectBatch) -> set[str]:
        """Leave out of the batch's guards the uuids the log holds now: it was planned before other
        workers' guards were read, and a guard it decided was no guard in the log then (a uuid of
        the log is not new), so one there now was appended since (by another worker, or by this
        one's append whose answer was lost). Answers those counted from another copy (plan the batch
        again without them); one counted from this very copy takes no second guard. One lookup in
        the index per batch, whatever the others appended."""
        assert batch.guards is not None
        found, copies, logged = self.guard_index(batch.project_id).find(batch.guards["uuid"])
        found &= logged
        if not found.any():
            return set()
        copy = ["tag", "partition", "offset"]
        other = found & (copies[copy] != batch.guards[copy])
        counted = set(batch.guards["uuid"][other].tolist())
        batch.guards = batch.guards[~found]
        uuids = [g[0] for g in batch.effects.guards]
        return {u for u, k in zip(uuids, guard_keys(uuids).tolist(), strict=True) if k in counted}

    def _new_guards(self, project_id: int, batch: ProjectBatch) -> tuple[np.ndarray, set[str]]:
        """The guard records of the batch's events not counted yet, and the uuids counted (or planned)
        from another copy already (a resend, an overlapping replay). An event whose guard in the log
        holds this very copy is a replay of a batch whose home part is in: it takes no guard, and the
        shards' fences tell what they hold. One only planned from this very copy (a batch written
        again after Redis went away) takes its guard again: the append may not have happened, and
        one that did is found when the log is longer than this process knew (`_counted_elsewhere`)."""
        guards = batch.effects.guards
        if not guards:
            return guard_records(np.empty(0, "V16"), 0, np.empty(0), np.empty(0), np.empty(0)), set()
        uuids, partitions, offsets, persons = (list(column) for column in zip(*guards, strict=True))
        ids = guard_keys(uuids)
        found, copies, logged = self.counted_copies_of(project_id, uuids, ids)
        tag, partition, offset = tag_code(batch.tag), np.array(partitions, np.uint32), np.array(offsets, np.int64)
        this = (copies["tag"] == tag) & (copies["partition"] == partition) & (copies["offset"] == offset)
        other = found & ~this
        new = ~found | (this & ~logged)
        return (guard_records(ids[new], tag, partition[new], offset[new], np.array(persons, np.int64)[new]),
                {uuids[i] for i in np.flatnonzero(other).tolist()})

    def merges_after(self, read: dict[int, int | None]) -> dict[int, tuple[int, list[tuple[int, int]]]]:
        """Per project, the length of its merge log and the merges (merged person, the person it became)
        past the `read` entries, in the order they were made; for None, the length alone."""
        pipe = self.redis.pipeline(transaction=False)
        for pid, at in read.items():
            if at is None:
                pipe.llen(keys.merge_log(pid))
            else:
                pipe.lrange(keys.merge_log(pid), at, -1)
        out: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        for (pid, at), answer in zip(read.items(), pipe.execute() if read else [], strict=True):
            out[pid] = (int(answer), []) if at is None else (at + len(answer), [read_merge(e) for e in answer])
        return out

    def take_guards(self, batch: ProjectBatch, earlier: np.ndarray | None = None) -> set[str]:
        """Decide, while planning, which of the batch's events take a guard: those neither in the
        project's guard log nor planned by an earlier batch. The answer names the events counted
        from another copy already (plan again without them); otherwise their guards are kept in the
        batch for its home part, and held as planned. A batch planned again after a refusal keeps
        the guards decided for it (`earlier`), less the events it leaves out now (it saw no other
        workers' guards, so it is looked up again if this process ever read some)."""
        if earlier is not None:
            batch.guards = earlier[np.isin(earlier["uuid"], guard_keys([g[0] for g in batch.effects.guards]))]
            return set()
        batch.foreign_basis = self._foreign_count[batch.project_id]  # read before the index is
        new, repeated = self._new_guards(batch.project_id, batch)
        if not repeated:
            self.guard_index(batch.project_id).add(new, logged=False)
            batch.guards = new
        return repeated

    def apply(self, batches: Iterable[ProjectBatch]) -> BatchOutcome:
        """Apply the home parts (one atomic call per project), then the shard parts of the projects
        whose home part is in (one atomic call per project and shard); each step one round trip per
        Redis server, and again for a home part whose guard log another worker appended to."""
        outcome = BatchOutcome()
        batches = list(batches)
        homes = []
        for batch in batches:
            if batch.home_done:
                continue
            if batch.guards is None and (repeated := self.take_guards(batch)):
                outcome.repeated[batch.project_id] = repeated
                continue
            homes.append(batch)
        for _ in range(100):
            for batch in list(homes):  # guards other workers appended after it was planned
                pid = batch.project_id
                late = self._foreign_count[pid] > batch.foreign_basis
                if late and (repeated := self._counted_elsewhere(batch)):
                    outcome.repeated[pid] = repeated
                    homes.remove(batch)
            calls = [([keys.distinct_ids(b.project_id)],
                      [*b.home_args(), self.guard_index(b.project_id).known, b.guards.tobytes()]) for b in homes]
            moved = []
            for batch, answer in zip(homes, run_scripts(self.redis, self._apply, calls), strict=True):
                pid = batch.project_id
                if int(answer[0]) == -5:
                    moved.append((batch, int(answer[1])))
                    continue
                self.guard_index(pid).known = int(answer[1])
                outcome.home.add(pid)
                outcome.applied.events += int(answer[0])
            homes = [batch for batch, held in moved]
            for batch, held in moved:  # another worker appended: read it (checked above on the next turn)
                self._read_appended(batch.project_id, held)
            if not homes:
                break
        else:
            raise RuntimeError("guard logs kept moving while applying a batch")
        parts = [(b, shard) for b in batches if b.home_done or b.project_id in outcome.home
                 for shard in b.effects.shards if shard not in b.shards_done]
        calls = [([keys.shard_applied(b.project_id, shard)], b.shard_args(shard)) for b, shard in parts]
        for (batch, shard), answer in zip(parts, run_scripts(self.redis, self._apply_shard, calls), strict=True):
            pid, code = batch.project_id, int(answer[0])
            if code == -1:
                outcome.stale.add(pid)
            elif code == -3:
                outcome.held.setdefault(pid, {})[shard] = {int(_text(answer[i]).rpartition(":")[2]): int(answer[i + 1])
                                                            for i in range(1, len(answer), 2)}
            else:
                outcome.shards.setdefault(pid, set()).add(shard)
                outcome.applied.failed.update(_failures(pid, answer))
        return outcome

    def counted_copies(self, project_id: int, tag: str, partition: int, items: list[BackfillRow]
                       ) -> list[BackfillRow]:
        """The rows of a partition's history read from the topic whose uuid guard holds this copy (the
        copy live counted), each with the person live counted it for; the others are left out."""
        candidates = [row for row in items if row.event is not None and row.contribution is not None]
        self.read_guard_log(project_id, self.guard_index(project_id))  # what live counted since
        found = self.counted_from(project_id, [row.event.uuid for row in candidates if row.event is not None])
        tag = tag_code(tag)
        counted: list[tuple[BackfillRow, int]] = []
        for row, copy in zip(candidates, found, strict=True):
            if copy is None or copy[1:3] != (partition, row.offset) or copy[0] not in (tag, NO_TOPIC):
                continue  # another copy was counted (or none); NO_TOPIC: an older guard, naming no topic
            counted.append((row, copy[3]))
        unknown = [row.event.distinct_id for row, person in counted if person < 0 and row.event]
        if unknown:  # guards written before they named the person: the distinct id's person now
            ids = dict(zip(unknown, self.redis.hmget(keys.distinct_ids(project_id), unknown), strict=True))
            counted = [(row, person if person >= 0 else int(ids[row.event.distinct_id] or -1) if row.event else -1)
                       for row, person in counted]
        return [replace(row, person=person) for row, person in counted if person >= 0]

    def backfill(self, definition: Definition, name: str, items: list[BackfillRow], written_up_to: int = -1
                 ) -> Applied:
        """Apply history of topic partition `name` (`tag:partition`) to a definition: rows with a person
        (the copy live counted, from the archive or checked by `counted_copies`), each in its person's
        state shard; every shard's fence moves to the last offset given (rows without a person only
        move it). `written_up_to` is the last offset this process wrote for it; a fence behind it
        means Redis lost writes (`RedisLostWrites`)."""
        pid, h = definition.project_id, definition.hash
        by_shard: dict[int, list[Any]] = {s: [] for s in range(self.shards)}
        for row in items:
            if row.person is None or row.event is None or row.contribution is None:
                continue
            by_shard[keys.shard_of(row.person, self.shards)] += [
                row.offset, row.person, row.hour, row.day, row.event.ts_ms, row.event.uuid,
                orjson.dumps(list(row.contribution)).decode()]
        through = max((row.offset for row in items), default=-1)
        width = len(scripts.BACKFILL_FIELDS)
        calls = [([keys.shard_applied(pid, s)], [keys.shard_prefix(pid, s), h, definition.flags, name, through,
                                                 len(rows) // width, *rows, written_up_to])
                 for s, rows in by_shard.items()]
        result = Applied()
        for answer in run_scripts(self.redis, self._backfill, calls):
            if int(answer[0]) == -2:
                raise RedisLostWrites(f"the backfill fence of {h} on {name} is behind "
                                      f"offset {written_up_to}, which this process wrote")
            result.events += int(answer[0])
            result.failed.update(_failures(pid, answer))
        return result

    def backfill_limits(self, project_id: int, h: str, name: str) -> dict[int, tuple[int, int]]:
        """Per state shard, (fence, limit) of a definition's backfill on topic partition `name`: the
        backfill applies the offsets above the fence and below the limit (its bound, or the live
        handover if lower)."""
        d = keys.definition_prefix(project_id, h)
        pipe = self.redis.pipeline(transaction=False)
        for s in range(self.shards):
            for key in (keys.backfill_fence(d), keys.backfill_bound(d), keys.handover(d)):
                pipe.hget(keys.in_shard(key, s), name)
        raw = pipe.execute()
        out = {}
        for s in range(self.shards):
            fence, bound, handover = raw[3 * s: 3 * s + 3]
            limit = int(bound or 0) if handover is None else min(int(bound or 0), int(handover))
            out[s] = (int(fence) if fence is not None else -1, limit)
        return out

    def backfill_progress(self, project_id: int, h: str, name: str) -> dict[int, int]:
        """Per state shard, the last person a backfill written person by person has written on topic
        partition `name` (-1: none), while its fence has not moved (`backfill_persons`)."""
        d = keys.definition_prefix(project_id, h)
        pipe = self.redis.pipeline(transaction=False)
        for s in range(self.shards):
            pipe.hget(keys.in_shard(keys.backfill_progress(d), s), name)
        return {s: int(raw) if raw is not None else -1 for s, raw in enumerate(pipe.execute())}

    def backfill_persons(self, definition: Any, name: str, kept: dict[int, dict[int, str]],
                         limits: dict[int, tuple[int, int]], progress: dict[int, int], through: int,
                         written_up_to: int = -1, batch_bytes: int = 4 << 20, last: bool = True) -> Applied:
        """Append to each person of each state shard the kept events `kept[shard][person]` its archived
        history on topic partition `name` gives a summarised definition, the persons above the shard's
        progress in ascending order, about `batch_bytes` per call; with `last` (the partition's last
        persons; else every person here is below those of later calls) each shard's last call moves
        its fence to `through` (`backfill_persons.lua`). `limits` and `progress` as read before evaluating
        (`backfill_limits`, `backfill_progress`): `FenceMoved` if any moved since (what was written
        stays, and the progress says so); `RedisLostWrites` if a fence is behind what this process wrote.
        The answer's `events` stays 0: the caller knows the events it evaluated."""
        pid, h = definition.project_id, definition.hash
        calls: list[tuple[list[str], list[Any]]] = []
        for s in range(self.shards):
            fence, limit = limits[s]
            persons = sorted(p for p in kept.get(s, {}) if p > progress[s])
            batches: list[list[int]] = [[]]
            size = 0
            for person in persons:
                if size >= batch_bytes:
                    batches.append([])
                    size = 0
                batches[-1].append(person)
                size += len(kept[s][person])
            last_written = progress[s]
            for i, batch in enumerate(batches):
                if not batch and not last:
                    continue
                args: list[Any] = [keys.shard_prefix(pid, s), h, name, fence, limit, last_written,
                                   int(last and i == len(batches) - 1), through, written_up_to, len(batch)]
                for person in batch:
                    args += [person, kept_block(h, kept[s][person].encode())]
                calls.append(([keys.shard_applied(pid, s)], args))
                if batch:
                    last_written = batch[-1]
        result = Applied()
        for start in range(0, len(calls), 8):  # a few calls per round trip, each of a few MB
            for answer in run_scripts(self.redis, self._backfill_persons, calls[start:start + 8]):
                code = int(answer[0])
                if code == -2:
                    raise RedisLostWrites(f"the backfill fence of {h} on {name} is behind offset {written_up_to}, "
                                          "which this process wrote")
                if code == -4:
                    raise FenceMoved(f"the backfill of {h} on {name} moved since it was read")
                result.failed.update(_failures(pid, answer))
        return result

    def backfill_sums(self, definition: Any, name: str, sums: dict[int, DefinitionSums] | dict[int, KeptHistory],
                      limits: dict[int, tuple[int, int]], through: int, written_up_to: int = -1) -> Applied:
        """Apply what archived events of topic partition `name` add to a definition, per state shard
        between the fence and limit read (`backfill_limits`): summed for a counting definition, the
        events it keeps for a funnel or paths (`KeptHistory`). Every shard's fence moves to `through`,
        each shard in one call (`backfill_sums.lua`). `FenceMoved` if a fence or limit moved since it
        was read (nothing of that shard written); `RedisLostWrites` if a fence is behind what this
        process wrote."""
        return self.backfill_sums_write(definition, name, sums, limits, through, written_up_to)()

    def backfill_sums_write(self, definition: Any, name: str,
                            sums: dict[int, DefinitionSums] | dict[int, KeptHistory],
                            limits: dict[int, tuple[int, int]], through: int,
                            written_up_to: int = -1) -> Callable[[], Applied]:
        """`backfill_sums` in two parts: its arguments encoded now, and the call that sends them and
        reads the answers, to run later (on another thread: it mostly waits for Redis)."""
        pid, h = definition.project_id, definition.hash

        counting = isinstance(definition, Definition)
        first_bitmap = len(scripts.BACKFILL_SUMS.layout("A").fields) + 1

        def arguments(part: Any) -> list[Any]:
            """The batch, then the bitmaps of its dense person sets (section DB names them)."""
            if not counting:
                kept_rows, kept = kept_sections(((h, day, rows) for day, rows in part.days.items()),
                                                ((p, {h: [kept]}) for p, kept in part.persons.items()))
                return [orjson.dumps(definition_sections({}) | kept_rows), kept]
            dense = [key for key in part.counts if _dense(part.persons[key])]
            batch = {**definition_sections({h: part}, set(dense)), **kept_sections((), ())[0],
                     "DB": [[h, kind, bv, str(bucket), first_bitmap + i] for i, (kind, bv, bucket) in enumerate(dense)]}
            return [orjson.dumps(batch), b"", *(person_bitmap(part.persons[key]) for key in dense)]

        calls = [([keys.shard_applied(pid, s)],
                  [keys.shard_prefix(pid, s), h, name, *limits[s], through, written_up_to, *arguments(sums[s])])
                 for s in range(self.shards)]

        def write() -> Applied:
            result = Applied()
            moved = []
            for s, answer in zip(range(self.shards), run_scripts(self.redis, self._backfill_sums, calls), strict=True):
                code = int(answer[0])
                if code == -2:
                    raise RedisLostWrites(f"the backfill fence of {h} on {name} is behind offset {written_up_to}, "
                                          "which this process wrote")
                if code == -4:
                    moved.append(s)
                    continue
                part = sums[s]
                result.events += sum(part.counts[k] for k in part.counts if k[0] == "d") if counting else part.events
                result.failed.update(_failures(pid, answer))
            if moved:
                raise FenceMoved(f"the backfill fences or limits of {h} on {name} moved in shards {moved}")
            return result

        return write
