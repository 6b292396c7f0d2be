"""The Lua scripts of state/lua/ against a real Redis, called with arguments built by name from their
layouts (state/scripts.py), the live batch through the store's encoder: guards, sums per key, state
shards and their fences, person resolution, property order, first-time moves, offsets, definition
failures, backfill bounds and fences, stream bookkeeping and summary writes (the summariser's and a
backfill's)."""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from dataflows.definitions import person_states
from dataflows.operators.batch import KnownFirsts, Occurrence, batch_effects
from dataflows.operators.history_summaries import Summarised
from dataflows.operators.persons import KnownPersons, PersonProperties, person_update
from schemas.events import TopicEvent
from state import keys, scripts
from state.connection import connect, run_scripts
from state.records import NO_TOPIC, StoredEvent, encode_person_events, kept_append, kept_block, rewritten_log, tag_code
from state.store import BatchOutcome, ProjectBatch, Resolved, StateStore
from state.summaries import SummaryStore
from tests.conftest import Services

_projects = itertools.count(900_000)
DAY_MS = 86_400_000


@pytest.fixture
def client(services: Services) -> redis.Redis:
    return connect(services.redis_url)


def _args(script: scripts.Script, header: dict[str, Any], items: list[dict[str, Any]] = (),
          trailer: dict[str, Any] | None = None, item: str = "E") -> list[Any]:
    args: list[Any] = []
    for layout in script.layouts:
        if layout.first is None:
            args += [header[f] for f in layout.fields]
    fields = script.layout(item).fields
    for values in items:
        args += [values.get(f, "") for f in fields]
    if trailer:
        args += [trailer[f] for f in script.layout("T").fields]
    return args


def _event(uuid: str, distinct_id: str, ts: int, event: str = "view", offset: int = 0, partition: int = 0,
           properties: dict[str, Any] | None = None, contributions: list[Any] | None = None) -> Occurrence:
    occurrence = Occurrence.of(TopicEvent(uuid, event, distinct_id, ts, properties or {}),
                               ts // 3_600_000 * 3600, str(20240101 + ts // DAY_MS), partition, offset)
    occurrence.contributions = contributions
    return occurrence


class Project:
    """A project's batches through the store as the dataflow sends them: persons resolved by
    `resolve_persons.lua` (every event asked, as a worker that knows no one), then the batch summed
    by the pure operator and applied by `apply_batch.lua` and `apply_shard.lua`."""

    def __init__(self, client: redis.Redis, shards: int = 1, tag: str = "t1") -> None:
        self.id = next(_projects)
        self.tag = tag  # the topic's (keys.topic_tag)
        self.client = client
        self.prefix = keys.project_prefix(self.id)
        self.store = StateStore(client, shards)

    def resolve(self, events: list[Occurrence]) -> Resolved:
        asks = [(o.uuid, o.distinct_id, o.update.link_kind or "", o.update.other_distinct_id or "") for o in events]
        resolved = self.store.resolve_persons({self.id: asks})[self.id]
        for o in events:
            o.person = resolved.persons.get(o.distinct_id)
        return resolved

    def apply(self, events: list[Occurrence], flags: dict[str, str] | None = None, generation: int = 0,
              skip: set[str] | None = None, fences: dict[int, dict[int, int]] | None = None,
              home_only: bool = False) -> BatchOutcome:
        """`home_only`: the home part alone, as when a worker dies before sending the shards' parts."""
        self.resolve(events)
        effects = batch_effects(events, KnownFirsts(), skip, flags, self.store.shards, fences)
        if home_only:
            effects.shards = {}
        return self.store.apply([ProjectBatch(self.id, effects, generation, self.tag)])

    def person(self, distinct_id: str) -> bytes | None:
        return self.client.hget(keys.distinct_ids(self.id), distinct_id)



def test_scripts_answer_in_order_and_are_loaded_again_when_redis_lost_them(client: redis.Redis) -> None:
    """run_scripts sends `EVALSHA` without asking first whether Redis holds the script: after a restart
    (here SCRIPT FLUSH) the refused calls are sent again once it is loaded, in their order, and a
    script's own error is raised."""
    tag = f"{{rs{next(_projects)}}}"
    counter = client.register_script("return {redis.call('INCRBY', KEYS[1], ARGV[1]), ARGV[2]}")
    calls = [([f"{tag}n"], [by, f"call {i}"]) for i, by in enumerate((1, 2, 3))]
    assert run_scripts(client, counter, calls) == [[1, b"call 0"], [3, b"call 1"], [6, b"call 2"]]
    client.script_flush()
    assert run_scripts(client, counter, calls) == [[7, b"call 0"], [9, b"call 1"], [12, b"call 2"]]
    with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
        run_scripts(client, counter, [([f"{tag}n"], [1, "fine"]), ([f"{tag}n"], ["x", "refused"])])
    assert int(client.get(f"{tag}n")) == 13  # the call before the refused one was applied


def test_guards_apply_each_uuid_once_and_a_batch_with_a_repeat_writes_nothing(client: redis.Redis) -> None:
    project = Project(client)
    assert project.apply([_event("u-1", "a", 1000, offset=5, partition=2)]).applied.events == 1
    # The same uuid again (an SDK resend, a replay): the whole batch is refused, naming it ...
    again = [_event("u-1", "a", 1000, offset=9, partition=3), _event("u-2", "a", 2000, offset=10, partition=3)]
    refused = project.apply(again)
    assert refused.repeated == {project.id: {"u-1"}} and refused.applied.events == 0
    assert StateStore(client).counted_from(project.id, ["u-2"]) == [None]  # no guard taken
    assert client.hgetall(keys.day_counts(project.id, "view")) == {b"20240101": b"1"}
    # ... and planned again without it: the rest counts once, the first copy's guard is kept.
    assert project.apply(again, skip={"u-1"}).applied.events == 1
    assert StateStore(client).counted_from(project.id, ["u-1"]) == [(tag_code("t1"), 2, 5, int(project.person("a")))]
    assert client.hgetall(keys.day_counts(project.id, "view")) == {b"20240101": b"2"}
    assert client.bitcount(keys.day_persons(project.id, "view", "20240101")) == 1
    # Applied offsets are the next offset per partition and only rise.
    assert client.hgetall(keys.project_applied(project.id)) == {b"2": b"6", b"3": b"11"}
    project.apply([_event("u-3", "a", 3000, offset=1, partition=2)])
    assert client.hget(keys.project_applied(project.id), "2") == b"6"
    assert client.hget(keys.project_meta(project.id), "earliest_ms") == b"1000"
    # A repeat inside one batch counts once.
    assert project.apply([_event("u-4", "b", 4000), _event("u-4", "b", 4000)]).applied.events == 1


def test_two_workers_share_a_projects_guard_log(client: redis.Redis) -> None:
    """Each worker decides from what it read of the guard log; the script appends only where the log
    is what that worker read, so a uuid another worker counted meanwhile is found, not counted twice."""
    first = Project(client)
    second = Project(client)
    second.id, second.store = first.id, StateStore(client, 1)
    assert second.store.guard_index(first.id).known == 0  # read before the first worker counts
    assert first.apply([_event("w-1", "a", 1000, offset=0, partition=0)]).applied.events == 1
    # The second worker holds another copy of w-1 (another partition): refused once it has read the log.
    refused = second.apply([_event("w-1", "a", 1000, offset=0, partition=1), _event("w-2", "a", 2000, offset=1,
                                                                                   partition=1)])
    assert refused.repeated == {first.id: {"w-1"}} and refused.applied.events == 0
    assert second.apply([_event("w-2", "a", 2000, offset=1, partition=1)]).applied.events == 1
    # Nothing in common, but the log moved under the first worker: it reads on and appends.
    assert first.apply([_event("w-3", "a", 3000, offset=1, partition=0)]).applied.events == 1
    assert client.hgetall(keys.day_counts(first.id, "view")) == {b"20240101": b"3"}
    log = StateStore(client).guard_index(first.id)
    assert log.known == 3 and not log.legacy
    assert [c[1:3] for c in StateStore(client).counted_from(first.id, ["w-1", "w-2", "w-3"])] == [
        (0, 0), (1, 1), (0, 1)]


def test_a_batch_planned_before_another_worker_counted_its_uuid_is_refused(client: redis.Redis) -> None:
    """A worker plans batches ahead of applying them. One planned before it read another worker's
    guard of the same uuid is checked against that guard when applied, though the log's length
    then matches what the worker knows."""
    first, second = Project(client), Project(client)
    second.id = first.id
    events = {u: _event(u, "a", 1000, offset=i, partition=1) for i, u in enumerate(("s-a", "s-x"))}
    second.resolve(list(events.values()))
    planned = [ProjectBatch(first.id, batch_effects([events[u]], KnownFirsts()), 0, "t1") for u in events]
    assert [second.store.take_guards(b) for b in planned] == [set(), set()]
    assert first.apply([_event("s-x", "a", 1000, offset=7, partition=0)]).applied.events == 1  # another copy
    assert second.store.apply([planned[0]]).applied.events == 1  # the log moved: read on, nothing in common
    refused = second.store.apply([planned[1]])
    assert refused.repeated == {first.id: {"s-x"}} and refused.applied.events == 0
    assert client.hgetall(keys.day_counts(first.id, "view")) == {b"20240101": b"2"}
    assert [c[1:3] for c in StateStore(client).counted_from(first.id, ["s-a", "s-x"])] == [(1, 0), (0, 7)]
    # Planned again without the repeat, a batch keeps the guards decided for the rest.
    pair = [_event("s-y", "a", 1000, offset=5, partition=1), _event("s-z", "a", 1000, offset=6, partition=1)]
    second.resolve(pair)
    whole = ProjectBatch(first.id, batch_effects(pair, KnownFirsts()), 0, "t1")
    assert second.store.take_guards(whole) == set() and len(whole.guards) == 2
    rest = ProjectBatch(first.id, batch_effects(pair, KnownFirsts(), {"s-y"}), 0, "t1")
    assert second.store.take_guards(rest, whole.guards) == set()
    assert rest.guards["offset"].tolist() == [6] and second.store.apply([rest]).applied.events == 1


def test_a_batch_written_again_takes_its_guards_once(client: redis.Redis) -> None:
    """A batch written again (Redis went away before its answer came back) is planned afresh: its
    guards were planned, maybe appended; they are appended once either way."""
    project = Project(client)
    assert project.apply([_event("r-1", "a", 1000, offset=0)]).applied.events == 1
    project.store.guard_index(project.id).known -= 1  # as if the append's answer was lost
    again = project.apply([_event("r-1", "a", 1000, offset=0), _event("r-2", "a", 2000, offset=1)])
    assert again.applied.events == 1 and again.repeated == {}
    unsent = [_event("r-3", "a", 3000, offset=2)]  # planned, and Redis went away before it was sent
    project.resolve(unsent)
    assert project.store.take_guards(ProjectBatch(project.id, batch_effects(unsent, KnownFirsts()), 0, "t1")) == set()
    assert project.apply([_event("r-3", "a", 3000, offset=2)]).applied.events == 1
    fresh = StateStore(client)
    assert fresh.guard_index(project.id).known == 3 and fresh.counted_from(project.id, ["r-1"])[0][2] == 0


def test_the_guard_log_continues_in_the_next_segment(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log longer than a segment (`keys.GUARD_SEGMENT_RECORDS`) goes on in the next string, a batch
    crossing a segment's end split between the two."""
    monkeypatch.setattr(keys, "GUARD_SEGMENT_RECORDS", 3)
    project = Project(client)
    assert project.apply([_event(f"g-{i}", "a", 1000 + i, offset=i) for i in range(5)]).applied.events == 5
    assert project.apply([_event(f"g-{i}", "a", 1000 + i, offset=i) for i in range(5, 8)]).applied.events == 3
    assert [client.strlen(keys.guard_log(project.id, s)) // 40 for s in range(4)] == [3, 3, 2, 0]
    fresh = StateStore(client)
    assert fresh.guard_index(project.id).known == 8
    assert [c[2] for c in fresh.counted_from(project.id, [f"g-{i}" for i in range(8)])] == list(range(8))
    assert project.apply([_event("g-3", "a", 1003, offset=9)]).repeated == {project.id: {"g-3"}}


def test_guards_taken_before_the_guard_log_still_hold(client: redis.Redis) -> None:
    """A project that counted events before the guard log keeps its guards in the `seen:<bucket>`
    hashes: a resend of one of them is still a repeat, and a replay of that very copy passes."""
    project = Project(client)
    client.hset(keys.project_applied(project.id), "0", 8)
    for uuid, holder in (("old-1", "t1:0:5:3"), ("old-2", "0:6:3"), ("old-3", "0:7")):
        client.hset(keys.seen(project.id, keys.seen_bucket(uuid)), uuid, holder)
    assert project.store.counted_from(project.id, ["old-1", "old-2", "old-3", "new"]) == [
        (tag_code("t1"), 0, 5, 3), (NO_TOPIC, 0, 6, 3), (NO_TOPIC, 0, 7, -1), None]
    assert project.store.guard_index(project.id).legacy
    assert project.apply([_event("first", "a", 500, offset=8)]).applied.events == 1  # "a" has a person
    assert project.apply([_event("old-1", "a", 1000, offset=9)]).repeated == {project.id: {"old-1"}}
    replayed = project.apply([_event("old-1", "a", 1000, offset=5), _event("new", "a", 2000, offset=10)])
    assert replayed.applied.events == 1 and project.id in replayed.home  # old-1: this very copy, no new guard
    assert StateStore(client).guard_index(project.id).legacy  # remembered once the log exists


def test_counts_and_person_sets_are_summed_per_key(client: redis.Redis) -> None:
    project = Project(client)
    events = [_event(f"s-{i}", f"d{i % 3}", 1000 + i * 600_000, event=("a", "b")[i % 2]) for i in range(12)]
    assert project.apply(events).applied.events == 12
    hours: dict[bytes, int] = {}
    for o in events:
        if o.event == "a":
            hours[str(o.hour).encode()] = hours.get(str(o.hour).encode(), 0) + 1
    assert {k: int(v) for k, v in client.hgetall(keys.hour_counts(project.id, "a")).items()} == hours
    assert client.bitcount(keys.day_persons(project.id, "a", "20240101")) == 3
    assert client.smembers(keys.event_names(project.id)) == {b"a", b"b"}
    persons = {int(project.person(f"d{i}") or 0) for i in range(3)}
    bitmap = client.get(keys.day_persons(project.id, "b", "20240101")) or b""
    assert {i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (7 - i % 8) & 1} == persons  # SETBIT order


def test_a_batch_of_any_size_applies(client: redis.Redis) -> None:
    """Sections longer than Lua can unpack at once (first-time candidates, kept funnel events, names,
    repeats) go in slices."""
    project = Project(client)
    events = [_event(f"big-{i}", f"d{i}", 1000 + i, event=f"e{i % 9000}", contributions=[("aa", "", "s")])
              for i in range(20_000)]
    assert project.apply(events, flags={"aa": "f"}).applied.events == 20_000
    assert client.hlen(keys.first_seen(project.id, "e1")) == 3 and client.scard(keys.event_names(project.id)) == 9000
    kept = keys.definition_events(keys.definition_prefix(project.id, "aa"), "20240101")
    assert client.llen(kept) == 20_000
    resent = [_event(o.uuid, o.distinct_id, o.ts, event=o.event, offset=1) for o in events]  # other copies
    assert project.apply(resent, flags={"aa": "f"}).repeated[project.id] == {o.uuid for o in events}
    # One event name with 5,000 first-time candidates: read and written in slices, pairs kept together.
    many = [_event(f"one-{i}", f"d{i}", 2 * DAY_MS + i, event="one", offset=10 + i) for i in range(5_000)]
    assert project.apply(many).applied.events == 5_000
    firsts = client.hgetall(keys.first_seen(project.id, "one"))
    assert len(firsts) == 5_000 and firsts[project.person("d4321")] == f"{2 * DAY_MS + 4321}:".encode() + \
        f"{(2 * DAY_MS + 4321) // 3_600_000 * 3600}:20240103".encode()


def test_a_recreated_topic_starts_its_own_fences(client: redis.Redis) -> None:
    """A broker that lost its topics starts offsets again from 0: events there are new copies, not a
    replay of what the old topic's offsets fenced (and an old event resent there is a repeat)."""
    project = Project(client, shards=2)
    assert project.apply([_event(f"o-{i}", f"d{i}", 1000, offset=i) for i in range(10)]).applied.events == 10
    project.tag = "t2"
    fresh = project.apply([_event("n-1", "d1", 1000, offset=0), _event("n-2", "d2", 1000, offset=1)])
    assert fresh.held == {} and fresh.applied.events == 2
    assert project.apply([_event("o-3", "d3", 1000, offset=2)]).repeated == {project.id: {"o-3"}}
    assert sum(int(client.hget(keys.in_shard(keys.day_counts(project.id, "view"), s), "20240101") or 0)
               for s in range(2)) == 12


def test_identify_links_and_merges_only_unidentified_persons(client: redis.Redis) -> None:
    project = Project(client)
    project.apply([_event("e1", "anon", 1000), _event("e2", "user", 2000)])
    anon, user = project.person("anon"), project.person("user")
    assert anon != user
    resolved = project.resolve([_event("e3", "user", 3000, event="$identify",
                                       properties={"$anon_distinct_id": "anon"})])
    assert resolved.merges == [(int(anon or 0), int(user or 0))] and resolved.persons == {"anon": 2, "user": 2}
    assert project.person("anon") == project.person("user") == user
    assert client.hget(keys.merged(project.id), anon) == user
    assert client.smembers(keys.person_distinct_ids(project.id, user.decode())) == {b"anon", b"user"}
    # Both identified: identify does not merge; $merge_dangerously does.
    project.apply([_event("e4", "other", 4000, event="$identify", properties={"$anon_distinct_id": "x"})])
    other = project.person("other")
    project.apply([_event("e5", "user", 5000, event="$identify", properties={"$anon_distinct_id": "other"})])
    assert project.person("other") == other
    project.apply([_event("e6", "user", 6000, event="$merge_dangerously", properties={"alias": "other"})])
    assert project.person("other") == user
    # An event applied already changes no one: resolving it again links nothing.
    project.apply([_event("e7", "late", 7000)])
    late_alias = _event("e7", "late", 7000, event="$create_alias", properties={"alias": "new"})
    assert project.resolve([late_alias]).merges == []
    assert project.person("new") is None


def test_a_worker_learns_the_merges_another_worker_made_from_the_merge_log(client: redis.Redis) -> None:
    """A worker's cached persons (`KnownPersons`) follow merges another worker made: it reads the
    merge log past where it stood before learning anyone, and applies the merges in their order, so a
    chain (anon into user, then user into third) leaves every id at the last survivor."""
    project = Project(client)  # the other worker
    mine = StateStore(client, 1)
    known = KnownPersons()
    known.merges_read = mine.merges_after({project.id: None})[project.id][0]
    project.apply([_event("m1", "anon", 1000), _event("m2", "user", 2000), _event("m3", "third", 2500)])
    ids = ("anon", "user", "third")
    known.learn({did: int(project.person(did) or 0) for did in ids}, [])
    assert len({known.get(did) for did in ids}) == 3
    project.resolve([_event("m4", "user", 3000, event="$identify", properties={"$anon_distinct_id": "anon"})])
    project.resolve([_event("m5", "third", 4000, event="$merge_dangerously", properties={"alias": "user"})])
    length, merges = mine.merges_after({project.id: known.merges_read})[project.id]
    survivor = int(project.person("third") or 0)
    assert length == known.merges_read + 2 and [target for _, target in merges][-1] == survivor
    known.learn({}, merges)
    assert [known.get(did) for did in ids] == [survivor] * 3 == [int(project.person(did) or 0) for did in ids]
    assert mine.merges_after({project.id: length}) == {project.id: (length, [])}


def test_person_properties_follow_event_time_not_arrival(client: redis.Redis) -> None:
    project = Project(client)
    project.apply([_event("p1", "a", 5000, properties={"$set": {"plan": "pro"}, "$set_once": {"first": "late"}})])
    project.apply([_event("p2", "a", 1000, properties={"$set": {"plan": "free"}, "$set_once": {"first": "early"}})])
    person = project.person("a").decode()
    assert client.hgetall(keys.person_properties(project.id, person)) == {b"plan": b'"pro"', b"first": b'"early"'}
    project.apply([_event("p3", "a", 6000, properties={"$unset": ["plan"]})])
    assert client.hgetall(keys.person_properties(project.id, person)) == {b"first": b'"early"'}


def test_the_workers_person_property_rule_leaves_what_redis_does(client: redis.Redis) -> None:
    """Definitions reading person properties see the person as `PersonProperties` leaves it after
    each event of a batch; that is what Redis holds after the same updates in any order (ties in
    event time: the later to arrive wins). Resent copies change neither."""
    rng = random.Random(3)
    for trial in range(20):
        project = Project(client)
        updates = []
        for i in range(rng.randrange(1, 12)):
            props: dict[str, Any] = {}
            for op in rng.sample(["$set", "$set_once", "$unset"], rng.randrange(1, 3)):
                chosen = rng.sample(["plan", "seats", "ref"], rng.randrange(1, 3))
                props[op] = chosen if op == "$unset" else {k: f"{k}{i}" for k in chosen}
            updates.append((f"t{trial}-{i}", rng.randrange(1, 6) * 1000, props))
        updates += rng.sample(updates, min(3, len(updates)))  # resent copies, later in the stream
        worker = PersonProperties({}, {})
        sent: set[str] = set()
        for uuid, ts, props in updates:
            if uuid not in sent:  # a resend: Redis refuses it, `contributions` skips it
                sent.add(uuid)
                worker.apply(person_update(TopicEvent(uuid, "view", "a", ts, props)), ts)
                project.apply([_event(uuid, "a", ts, properties=props)])
        person = int(project.person("a"))
        assert person_states(client, project.id, [person])[person] == worker, updates


def test_a_merge_combines_person_properties_by_event_time_whoever_survives(client: redis.Redis) -> None:
    """The merged person's properties and the survivor's combine as their updates applied in time
    order would: the later `$set` or `$unset` wins, `$set` beats `$set_once`, the earlier `$set_once` wins."""
    early = {"$set": {"plan": "free", "gone": 1}, "$set_once": {"source": "ads", "ref": "a"}}
    late = {"$set": {"plan": "pro", "ref": "b"}, "$set_once": {"source": "seo"}, "$unset": ["gone"]}
    for merged_has_early in (True, False):  # the early updates on the merged person, or on the survivor
        project = Project(client)
        anon = _event("m1", "anon", 1000 if merged_has_early else 9000, properties=early if merged_has_early else late)
        user = _event("m2", "user", 9000 if merged_has_early else 1000, properties=late if merged_has_early else early)
        project.apply([anon, user])
        project.apply([_event("m3", "user", 10_000, event="$identify", properties={"$anon_distinct_id": "anon"})])
        person = project.person("user").decode()
        assert project.person("anon").decode() == person
        raw = client.hgetall(keys.person_properties(project.id, person))
        stored = {k.decode(): orjson.loads(v) for k, v in raw.items()}
        assert stored == {"plan": "pro", "source": "ads", "ref": "b"}


def test_a_late_earlier_event_moves_first_time(client: redis.Redis) -> None:
    project = Project(client)
    project.apply([_event("f1", "a", 2 * DAY_MS)])  # offsets rise, as on a partition
    assert client.hgetall(keys.first_time_day_counts(project.id, "view")) == {b"20240103": b"1"}
    project.apply([_event("f2", "a", DAY_MS, offset=1), _event("f3", "a", DAY_MS + 5, offset=2)])
    assert client.hgetall(keys.first_time_day_counts(project.id, "view")) == {b"20240103": b"0", b"20240102": b"1"}
    assert client.bitcount(keys.first_time_day_persons(project.id, "view", "20240103")) == 0
    assert client.bitcount(keys.first_time_day_persons(project.id, "view", "20240102")) == 1
    project.apply([_event("f4", "a", 3 * DAY_MS, offset=3)])  # later: nothing moves
    assert client.hget(keys.first_time_day_counts(project.id, "view"), "20240102") == b"1"
    # Moved to an earlier time in the same hour and day: the person's bit is cleared, then set again.
    project.apply([_event("f5", "b", DAY_MS + 100, offset=4)])
    project.apply([_event("f6", "b", DAY_MS + 50, offset=5)])
    assert client.hget(keys.first_time_day_counts(project.id, "view"), "20240102") == b"2"
    assert client.bitcount(keys.first_time_day_persons(project.id, "view", "20240102")) == 2
    hour = str((DAY_MS // 3_600_000) * 3600)
    assert client.hget(keys.first_time_hour_counts(project.id, "view"), hour) == b"2"
    assert client.bitcount(keys.first_time_hour_persons(project.id, "view", hour)) == 2


def test_a_shard_refuses_a_batch_planned_before_its_generation(client: redis.Redis) -> None:
    """A backfill fixing its bound raised the shard's generation: a batch planned before is refused
    there (the home part, which no definition changes, is in) and counts once when planned again."""
    project = Project(client)
    client.set(keys.shard_generation(project.id, 0), 1)
    refused = project.apply([_event("g1", "a", 1000)], generation=0)
    assert refused.stale == {project.id} and refused.home == {project.id} and refused.shards == {}
    assert client.exists(keys.day_counts(project.id, "view")) == 0
    assert project.apply([_event("g1", "a", 1000)], generation=1).shards == {project.id: {0}}
    assert client.hgetall(keys.day_counts(project.id, "view")) == {b"20240101": b"1"}


def test_state_shards_keep_each_persons_events_and_count_each_event_once(client: redis.Redis) -> None:
    """Three shards: each person's counts and person sets in shard person % 3 only; a replay after a
    crash between the home part and the shards' parts, and one after every part, count once."""
    project = Project(client, shards=3)
    events = [_event(f"sh-{i}", f"d{i % 7}", 1000 + i, offset=i, partition=1) for i in range(60)]
    project.apply(events[:30], home_only=True)  # the worker died before the shards' parts
    assert client.exists(keys.day_counts(project.id, "view")) == 0
    outcome = project.apply(events)  # replayed with more: the guards are its own copies
    assert outcome.repeated == {} and outcome.shards == {project.id: {0, 1, 2}}
    persons = {o.distinct_id: int(project.person(o.distinct_id) or 0) for o in events}
    for shard in range(3):
        mine = [o for o in events if persons[o.distinct_id] % 3 == shard]
        counts = client.hgetall(keys.in_shard(keys.day_counts(project.id, "view"), shard))
        assert counts == ({b"20240101": str(len(mine)).encode()} if mine else {})
        day = keys.in_shard(keys.day_persons(project.id, "view", "20240101"), shard)
        assert client.bitcount(day) == len({o.distinct_id for o in mine})
        assert client.hget(keys.shard_applied(project.id, shard), "t1:1") == (
            str(max(o.offset for o in mine) + 1).encode() if mine else None)
    # Every part applied, then the batch again (a restart from an older snapshot): each shard names
    # what it holds, and planned again without those events nothing is added.
    again = project.apply(events)
    assert again.repeated == {} and set(again.held[project.id]) == {keys.shard_of(p, 3) for p in persons.values()}
    assert project.apply(events, fences=again.held[project.id]).shards == {}
    assert sum(int(client.hget(keys.in_shard(keys.day_counts(project.id, "view"), s), "20240101") or 0)
               for s in range(3)) == 60


def test_a_refused_definition_write_fails_that_definition_only(client: redis.Redis) -> None:
    project = Project(client)
    h, prefix = "ab12", keys.definition_prefix(project.id, "ab12")
    client.set(keys.definition_key(prefix, "cd", "x"), "not a hash")  # Redis will refuse HINCRBY on it
    answer = project.apply([_event("d1", "a", 1000, contributions=[("ab12", "x", None), ("cd34", "y", 2.5)])],
                           flags={h: "", "cd34": ""}).applied
    assert answer.events == 1 and b"WRONGTYPE" in answer.failed[(project.id, h)].encode()
    assert client.hgetall(keys.day_counts(project.id, "view")) == {b"20240101": b"1"}  # the event counts
    other = keys.definition_prefix(project.id, "cd34")
    assert client.hgetall(keys.definition_key(other, "cd", "y")) == {b"20240101": b"1"}


def test_funnel_and_summary_definitions_keep_events(client: redis.Redis) -> None:
    project = Project(client)
    c = lambda h: [(h, "", '{"s":1}')]  # noqa: E731
    project.apply([_event("k1", "a", 1000, contributions=c("aa")), _event("k2", "a", 2000, contributions=c("bb"))],
                  flags={"aa": "f", "bb": "s"})
    person = project.person("a").decode()
    kept = client.lrange(keys.definition_events(keys.definition_prefix(project.id, "aa"), "20240101"), 0, -1)
    assert kept == [f'{person}|1000|k1|{{"s":1}}'.encode()]
    b = keys.definition_prefix(project.id, "bb")
    assert client.get(keys.kept_log(project.id, 0, person)) == b'bb,26;2000,20240101,k2,7:{"s":1}'
    assert client.smembers(keys.summary_dirty(b)) == {person.encode()}

    # Records of several persons and definitions in one batch, values of multi-byte characters: each
    # person's own records land on its kept log, whole, every definition's in one append.
    values = {"a": '["é"]', "b": '["€🙂"]', "c": '"x"'}
    batch = [_event(f"m{i}", did, 3000 + i, offset=10 + i,
                    contributions=[("bb", "", values[did]), ("cc", "", values[did])])
             for i, did in enumerate(("a", "b", "c", "b"))]
    project.apply(batch, flags={"bb": "s", "cc": "s"})
    summaries = SummaryStore(client, 1)
    for did in ("a", "b", "c"):
        records = "".join(f"{o.ts},20240101,{o.uuid},{len(values[did].encode())}:{values[did]}"
                          for o in batch if o.distinct_id == did).encode()
        before = b'bb,26;2000,20240101,k2,7:{"s":1}' if did == "a" else b""
        person = project.person(did).decode()
        n = len(records)
        assert client.get(keys.kept_log(project.id, 0, person)) == before + b"bb,%d,cc,%d;%s%s" % (
            n, n, records, records)
        for h in ("bb", "cc"):
            old = b'2000,20240101,k2,7:{"s":1}' if (h, did) == ("bb", "a") else b""
            assert summaries.kept_events(project.id, h, [person]) == [old + records]
            assert client.sismember(keys.summary_dirty(keys.definition_prefix(project.id, h)), person)


def test_backfill_applies_the_counted_copy_below_each_shards_bound_once(client: redis.Redis) -> None:
    """Bounds are what each shard applied when first asked (and raise its generation); the backfill
    applies each event's counted copy, in the shard of the person it was counted for, below that
    shard's bound and live handover and above its fence, once."""
    from schemas.definitions import Definition
    from schemas.filters import parse_filters
    from state.registry import DefinitionRegistry
    from state.store import BackfillRow, RedisLostWrites

    project = Project(client, shards=2)
    definition = Definition(project_id=project.id, event="view", filters=parse_filters(None))
    h = definition.hash
    events = [_event("b1", "a", 1000, offset=0), _event("b2", "b", 2000, offset=1),
              _event("b1", "a", 1000, offset=2),  # a resend in the batch: the guard keeps offset 0
              _event("b3", "a", 3000, offset=3, contributions=[(h, "v", None)])]
    project.apply(events[:3])
    project.apply([events[3]], flags={h: ""})  # live saw the registration before the backfill's bound
    client.set(keys.definitions_generation(project.id), 4)
    registry = DefinitionRegistry(client, 2)
    a, b = int(project.person("a") or 0), int(project.person("b") or 0)
    assert a % 2 != b % 2
    bounds = {a % 2: 4, b % 2: 2}  # the next offset of what each shard counted (offset 2 counted nowhere)
    assert registry.bounds(project.id, h, "t1:0") == [bounds[0], bounds[1]]
    assert all(client.get(keys.shard_generation(project.id, s)) == b"4" for s in range(2))
    assert project.apply([_event("b4", "b", 4000, offset=5)], generation=3).stale == {project.id}  # planned before
    rows = [BackfillRow(o.offset, o.source, o.hour, o.day, ("v", None)) for o in events]
    store = StateStore(client, 2)
    counted = store.counted_copies(project.id, "t1", 0, rows)
    assert [(r.offset, r.person) for r in counted] == [(0, a), (1, b), (3, a)]  # offset 2 is not the counted copy
    marks = [BackfillRow(r.offset) for r in rows if r.offset not in {c.offset for c in counted}]
    assert store.backfill(definition, "t1:0", counted + marks).events == 2  # 3 is live's (its handover)
    prefix = keys.definition_prefix(project.id, h)
    assert [client.hget(keys.in_shard(keys.backfill_fence(prefix), s), "t1:0") for s in range(2)] == [b"3", b"3"]
    assert registry.fence(project.id, h, "t1:0") == 3
    assert sum(int(client.hget(keys.in_shard(keys.definition_key(prefix, "cd", "v"), s), "20240101") or 0)
               for s in range(2)) == 3  # b1, b2 by the backfill; b3 live
    assert store.backfill(definition, "t1:0", counted, 3).events == 0  # again: below the fences, nothing
    with pytest.raises(RedisLostWrites):
        store.backfill(definition, "t1:0", counted, 7)  # the fence is behind what we wrote: lost writes
    assert registry.bounds(project.id, h, "t1:0") == [bounds[0], bounds[1]]  # fixed once


def test_stream_bookkeeping_scripts(client: redis.Redis) -> None:
    from state.stream import Stream

    stream = Stream(client, f"topic-{next(_projects)}")
    stream.record({}, {1: 2})  # capture acknowledged events before the dataflow first started
    assert not stream.reset("id-1")  # the first topic replaces none
    assert stream.progress().ends == {1: 2}  # kept: they are this topic's
    stream.record({0: 5}, {0: 9, 1: 4})
    stream.record({0: 3}, {0: 7})  # late and lower: nothing moves back
    progress = stream.progress()
    assert (progress.applied, progress.ends, progress.lag()) == ({0: 5}, {0: 9, 1: 4}, 8)
    assert stream.count_dead_letters(["r1", "r2"]) == 2
    assert stream.count_dead_letters(["r2", "r3"]) == 1
    assert stream.progress().dlq_events == 3
    assert stream.applied_offsets("id-1") == {0: 5}
    assert not stream.reset("id-1")  # same topic: nothing forgotten
    assert stream.applied_offsets("id-1") == {0: 5}
    # Recreated: offsets forgotten, the dead-letter count kept, the new topic's ends taken in the same write.
    assert stream.reset("id-2", {0: 0, 1: 6})
    assert stream.applied_offsets("id-1") is None
    recreated = stream.progress()
    assert recreated == type(progress)("id-2", {}, {1: 6}, 3, "id-1", recreated.recreated_at_ms)
    assert recreated.lag() == 6
    assert abs((recreated.recreated_at_ms or 0) / 1000 - time.time()) < 60
    assert stream.count_dead_letters(["r1"]) == 1  # its records are new records


def test_summary_writes_are_fenced_by_kept_length(client: redis.Redis) -> None:
    """write_summaries.lua: the version is the length of the person's kept log and of its string kept
    before the kept log; a replacement rewrites the log (SummaryStore.kept reads it back) and drops the
    older string."""
    script = client.register_script(scripts.WRITE_SUMMARIES.source)
    project = next(_projects)
    prefix = keys.definition_prefix(project, "5a")
    log = keys.kept_log(project, 0, "7")
    client.set(keys.person_events(prefix, "7"), b"12345")  # an older layout's string: read beside the log
    client.set(log, b"99,3;abc")
    client.sadd(keys.summary_dirty(prefix), "7")

    def write(version: int, entries: list[tuple[str, str, bytes]], replacement: bytes | None = None) -> list[bytes]:
        layout = scripts.WRITE_SUMMARIES.layout
        person = {"person": "7", "version": version, "irregular": 1, "replaced": int(replacement is not None),
                  "replacement": replacement or b"", "entries": len(entries)}
        args: list[Any] = [{"prefix": prefix, "log": keys.kept_logs(project, 0), "count": 1}[f]
                           for f in layout("A").fields]
        args += [person[f] for f in layout("S").fields]
        for kind, day, value in entries:
            args += [{"kind": kind, "day": day, "value": value}[f] for f in layout("SE").fields]
        return script(keys=[keys.summary_dirty(prefix)], args=args)

    assert write(5, [("fa", "20240101", b"row")]) == []  # the kept events grew since: left dirty
    assert client.sismember(keys.summary_dirty(prefix), "7")
    assert write(13, [("fa", "20240101", b"row")]) == [b"7"]  # the persons written
    assert client.hget(keys.summary_rows(prefix, "fa", "20240101"), "7") == b"row"
    assert client.hget(keys.summary_versions(prefix, "fa"), "20240101") == b"1"
    assert not client.sismember(keys.summary_dirty(prefix), "7")
    assert client.hget(keys.irregular_persons(prefix), "7") == b"1"
    assert write(13, [("fa", "20240101", b"row")]) == [b"7"]  # unchanged value: the day's version stays
    assert client.hget(keys.summary_versions(prefix, "fa"), "20240101") == b"1"
    rewritten = rewritten_log(client.get(log) or b"", "5a", b"123", 13)
    assert len(rewritten) > 13  # padded: the length never comes back to one a reader saw
    assert write(13, [("fa", "20240101", b""), ("ps", "20240102", b"s")], replacement=rewritten) == [b"7"]
    assert client.hexists(keys.summary_rows(prefix, "fa", "20240101"), "7") is False
    assert client.hget(keys.summary_versions(prefix, "fa"), "20240101") == b"2"
    assert client.hget(keys.summary_rows(prefix, "ps", "20240102"), "7") == b"s"
    assert client.get(keys.person_events(prefix, "7")) is None
    store = SummaryStore(client, 1)
    assert store.kept_events(project, "5a", ["7"]) == [b"123"]
    assert store.kept_events(project, "99", ["7"]) == [b"abc"]  # another definition's records stay
    assert store.kept(project, "5a", ["7"])[0].version == len(rewritten)


@pytest.mark.parametrize("script", scripts.ALL, ids=lambda s: s.file)
def test_every_script_compiles(client: redis.Redis, script: scripts.Script) -> None:
    digest = client.script_load(script.source)
    assert client.script_exists(digest) == [True]


def test_backfilled_summaries_are_written_by_day_for_persons_whose_kept_events_are_the_backfills(
        client: redis.Redis) -> None:
    """backfill_summaries.lua through SummaryStore.write_backfilled: a person whose kept events grew
    past what the backfill gave it stays dirty and unwritten; the rest are written, one hash per day."""
    project = next(_projects)
    prefix = keys.definition_prefix(project, "5b")
    # 7's events: the backfill's (another definition's records beside them); 8's: more than the backfill
    # gave it; 9's: the backfill's, in the string an older layout kept; 10's log is damaged.
    for person, log in (("7", kept_append([("5b", b"123"), ("zz", b"abcd")]) + kept_block("5b", b"45")),
                        ("8", b"5b,7;1234567"), ("9", b""), ("10", b"5b,2;12zz,9;")):
        client.set(keys.kept_log(project, 0, person), log)
        client.sadd(keys.summary_dirty(prefix), person)
    client.set(keys.person_events(prefix, "9"), b"12")
    client.hset(keys.summary_rows(prefix, "fa", "20240102"), "9", b"old")
    summarised = Summarised("fa", np.array([7, 8, 9]), np.array([False, False, True]), np.array([7, 7, 8, 9]),
                            ["20240101", "20240102", "20240101", "20240102"], [b"r\x00w", b"row2", b"x", b""])
    written = SummaryStore(client, 1).write_backfilled(project, "5b", summarised, {7: 5, 8: 5, 9: 2})
    assert written == 2
    damaged = Summarised("fa", np.array([10]), np.array([False]), np.array([10]), ["20240101"], [b"d"])
    assert SummaryStore(client, 1).write_backfilled(project, "5b", damaged, {10: 2}) == 0
    assert client.smembers(keys.summary_dirty(prefix)) == {b"8", b"10"}
    assert client.hgetall(keys.summary_rows(prefix, "fa", "20240101")) == {b"7": b"r\x00w"}
    assert client.hgetall(keys.summary_rows(prefix, "fa", "20240102")) == {b"7": b"row2"}  # 9's emptied
    assert client.hgetall(keys.summary_versions(prefix, "fa")) == {b"20240101": b"1", b"20240102": b"1"}
    assert client.hgetall(keys.irregular_persons(prefix)) == {b"9": b"1"}
    # Every person written and no value empty: a day's pairs go to HSET as they are.
    summarised = Summarised("fa", np.array([7, 9]), np.array([False, False]), np.array([7, 9, 9]),
                            ["20240102", "20240102", "20240103"], [b"r7", b"r9", b"s9"])
    assert SummaryStore(client, 1).write_backfilled(project, "5b", summarised, {7: 5, 9: 2}) == 2
    assert client.hgetall(keys.summary_rows(prefix, "fa", "20240102")) == {b"7": b"r7", b"9": b"r9"}
    assert client.hgetall(keys.summary_rows(prefix, "fa", "20240103")) == {b"9": b"s9"}
    assert client.hgetall(keys.summary_versions(prefix, "fa")) == {b"20240101": b"1", b"20240102": b"2",
                                                                    b"20240103": b"1"}
    assert client.hgetall(keys.irregular_persons(prefix)) == {}
    # Written a slice of persons at a time: each call writes only its persons.
    summarised = Summarised("fa", np.array([7, 8, 9]), np.array([False, False, False]), np.array([7, 8, 9]),
                            ["20240104"] * 3, [b"a", b"b", b"c"])
    client.set(keys.kept_log(project, 0, "8"), b"5b,5;12345")
    store = SummaryStore(client, 1)
    assert store.write_backfilled(project, "5b", summarised, {7: 5, 8: 5, 9: 2}, 0, 2) == 2
    assert client.hgetall(keys.summary_rows(prefix, "fa", "20240104")) == {b"7": b"a", b"8": b"b"}
    assert store.write_backfilled(project, "5b", summarised, {7: 5, 8: 5, 9: 2}, 2, 3) == 1
    assert client.hgetall(keys.summary_rows(prefix, "fa", "20240104")) == {b"7": b"a", b"8": b"b", b"9": b"c"}


def test_a_backfill_written_person_by_person_gives_each_person_its_events_once(client: redis.Redis) -> None:
    """backfill_persons.lua through StateStore.backfill_persons: persons above the shard's progress are
    appended in ascending order over several calls, the last moving the fence; a backfill that restarts
    after a crash skips the persons written; a fence, limit or progress that moved writes nothing."""
    from types import SimpleNamespace

    from state.store import FenceMoved, RedisLostWrites

    project = next(_projects)
    definition = SimpleNamespace(project_id=project, hash="5c")
    prefix = keys.definition_prefix(project, "5c")
    store = StateStore(client, 2)
    for s in range(2):
        client.hset(keys.in_shard(keys.backfill_bound(prefix), s), "t1:0", 10)
    # A run that died after its first call in shard 0: person 2 has its events, the progress says so.
    client.append(keys.kept_log(project, 0, 2), kept_block("5c", b"a"))
    client.hset(keys.in_shard(keys.backfill_progress(prefix), 0), "t1:0", 2)
    kept = {0: {6: "c", 2: "a", 4: "bb"}, 1: {3: "yy", 1: "x"}}
    limits, progress = store.backfill_limits(project, "5c", "t1:0"), store.backfill_progress(project, "5c", "t1:0")
    assert limits == {0: (-1, 10), 1: (-1, 10)} and progress == {0: 2, 1: -1}
    store.backfill_persons(definition, "t1:0", kept, limits, progress, 9, batch_bytes=1)  # a call per person

    def events(person: int) -> bytes | None:
        return SummaryStore(client, 2).kept_events(project, "5c", [str(person)])[0] or None

    assert [events(p) for p in range(1, 7)] == [b"x", b"a", b"yy", b"bb", None, b"c"]
    assert [client.hget(keys.in_shard(keys.backfill_fence(prefix), s), "t1:0") for s in range(2)] == [b"9", b"9"]
    assert [client.hlen(keys.in_shard(keys.backfill_progress(prefix), s)) for s in range(2)] == [0, 0]
    assert client.smembers(keys.in_shard(keys.summary_dirty(prefix), 0)) == {b"4", b"6"}
    assert client.smembers(keys.in_shard(keys.summary_dirty(prefix), 1)) == {b"1", b"3"}
    with pytest.raises(FenceMoved):  # the fences moved since `limits` was read: nothing written again
        store.backfill_persons(definition, "t1:0", kept, limits, progress, 9)
    assert [events(p) for p in (2, 4)] == [b"a", b"bb"]
    with pytest.raises(RedisLostWrites):
        store.backfill_persons(definition, "t1:0", kept, store.backfill_limits(project, "5c", "t1:0"),
                               store.backfill_progress(project, "5c", "t1:0"), 12, written_up_to=11)
    # A partition written in chunks of whole persons: only the last chunk moves the fence.
    for s in range(2):
        client.hset(keys.in_shard(keys.backfill_bound(prefix), s), "t1:2", 10)
    limits = store.backfill_limits(project, "5c", "t1:2")
    store.backfill_persons(definition, "t1:2", {0: {10: "p"}, 1: {11: "q"}}, limits,
                           store.backfill_progress(project, "5c", "t1:2"), -1, last=False)
    assert store.backfill_progress(project, "5c", "t1:2") == {0: 10, 1: 11}
    assert [client.hget(keys.in_shard(keys.backfill_fence(prefix), s), "t1:2") for s in range(2)] == [None, None]
    store.backfill_persons(definition, "t1:2", {0: {12: "r"}}, limits,
                           store.backfill_progress(project, "5c", "t1:2"), 9)
    assert [events(p) for p in (10, 11, 12)] == [b"p", b"q", b"r"]
    assert [client.hget(keys.in_shard(keys.backfill_fence(prefix), s), "t1:2") for s in range(2)] == [b"9", b"9"]
    assert store.backfill_progress(project, "5c", "t1:2") == {0: -1, 1: -1}
    # A live handover below the bound lowers the limit: a backfill evaluated before it writes nothing.
    for s in range(2):
        client.hset(keys.in_shard(keys.backfill_bound(prefix), s), "t1:1", 10)
    limits = store.backfill_limits(project, "5c", "t1:1")
    client.hset(keys.in_shard(keys.handover(prefix), 1), "t1:1", 5)
    with pytest.raises(FenceMoved):
        store.backfill_persons(definition, "t1:1", {1: {7: "z"}}, limits, {0: -1, 1: -1}, 4)
    assert events(7) is None


def test_a_backfill_ors_dense_person_sets_in_whole_and_sets_sparse_ones_bit_by_bit(client: redis.Redis) -> None:
    """backfill_sums.lua through StateStore.backfill_sums: a person set dense enough goes as a bitmap
    (section DB), ORed into what live set already; a sparse one as bits; both equal SETBIT's."""
    from dataflows.operators.batch import DefinitionSums
    from schemas.definitions import Definition
    from schemas.filters import parse_filters
    from state.reads import person_bitmap
    from state.store import FenceMoved

    project = next(_projects)
    definition = Definition(project_id=project, event="view", filters=parse_filters(None))
    prefix = keys.definition_prefix(project, definition.hash)
    dense, sparse = set(range(3, 300, 2)), {5, 150_000}
    sums = DefinitionSums()
    sums.counts[("d", "v", "20240101")], sums.persons[("d", "v", "20240101")] = 200, dense
    sums.counts[("h", "v", 3600)], sums.persons[("h", "v", 3600)] = 2, sparse
    dense_key = keys.definition_key(prefix, "ud", "v", "20240101")
    client.setbit(dense_key, 1000, 1)  # a person live counted that day
    store = StateStore(client, 1)
    client.hset(keys.in_shard(keys.backfill_bound(prefix), 0), "t1:0", 10)
    limits = store.backfill_limits(project, definition.hash, "t1:0")
    assert limits == {0: (-1, 10)}
    store.backfill_sums(definition, "t1:0", {0: sums}, limits, 9)
    reference = {1000, *dense}
    assert [p for p in range(1200) if client.getbit(dense_key, p)] == sorted(reference)
    sparse_key = keys.definition_key(prefix, "uh", "v", "3600")
    assert client.bitcount(sparse_key) == 2 and client.getbit(sparse_key, 150_000) == 1
    assert client.hget(keys.definition_key(prefix, "cd", "v"), "20240101") == b"200"
    assert not client.exists(keys.project_prefix(project) + keys.PROJECT_PARTS["scratch"])
    assert person_bitmap([0, 9]) == bytes([0b1000_0000, 0b0100_0000])  # Redis's bit order
    # A fence or a limit that moved since they were read (a live handover below the bound) writes nothing.
    later = DefinitionSums()
    later.counts[("d", "v", "20240101")], later.persons[("d", "v", "20240101")] = 5, {8}
    with pytest.raises(FenceMoved):
        store.backfill_sums(definition, "t1:0", {0: later}, limits, 12)
    client.hset(keys.in_shard(keys.backfill_bound(prefix), 0), "t1:1", 20)
    limits = store.backfill_limits(project, definition.hash, "t1:1")
    client.hset(keys.in_shard(keys.handover(prefix), 0), "t1:1", 15)
    with pytest.raises(FenceMoved):
        store.backfill_sums(definition, "t1:1", {0: later}, limits, 12)
    assert client.hget(keys.definition_key(prefix, "cd", "v"), "20240101") == b"200"
    assert not client.getbit(dense_key, 8)
    store.backfill_sums(definition, "t1:1", {0: later}, store.backfill_limits(project, definition.hash, "t1:1"), 12)
    assert client.hget(keys.definition_key(prefix, "cd", "v"), "20240101") == b"205"


def test_definitions_sharing_kept_logs_summarise_each_its_own_records(client: redis.Redis,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ordered funnels whose events share each person's kept log (one append per person): drained
    in turn, each reads its own records (read a few persons per MGET), and what they write equals what
    a summary of each definition's records alone gives."""
    import state.summaries as summaries_module
    from dataflows.operators.summaries import summarise_groups
    from dataflows.summariser import Summariser
    from schemas.funnels import parse_funnel_request

    project = next(_projects)
    first, second = (parse_funnel_request({"events": [{"id": "view", "order": 0}, {"id": last, "order": 1}]},
                                          project, "UTC", []).definition for last in ("buy", "pay"))
    assert first.summaries and second.summaries
    persons = [str(p) for p in range(1, 41)]
    mine: dict[tuple[str, str], bytes] = {}
    for p in persons:
        stamp = 1709251200000 + int(p) * 1000
        records = {d.hash: encode_person_events([
            StoredEvent(stamp, "20240301", f"v{p}{d.hash}", orjson.dumps([0b01, 0, ""])),
            StoredEvent(stamp + k * 60000, "20240301", f"b{p}{d.hash}", orjson.dumps([0b10, 0, ""]))])
            for k, d in enumerate((first, second), start=1)}
        client.append(keys.kept_log(project, 0, p), kept_append(list(records.items())))
        mine.update({(h, p): r for h, r in records.items()})
    for d in (first, second):
        client.sadd(keys.summary_dirty(keys.definition_prefix(project, d.hash)), *persons)
        client.hset(keys.definition_meta(keys.definition_prefix(project, d.hash)), "kept", "log")
    monkeypatch.setattr(summaries_module, "READ_SLICE", 3)  # the logs read in several MGETs
    store = SummaryStore(client, 1)
    assert store.kept_events(project, first.hash, persons) == [mine[(first.hash, p)] for p in persons]
    summariser = Summariser(store, lambda letters: None)
    while store.pending(project, first.hash) or store.pending(project, second.hash):
        summariser.drain(first, budget=7)
        summariser.drain(second, budget=7)
    for d in (first, second):
        expected = summarise_groups(d, {p: {p: mine[(d.hash, p)]} for p in persons})
        rows: dict[tuple[str, str, str], bytes] = {}
        for plans in expected.values():
            for p, plan in plans.items():
                rows.update({(kind, day, p): value for kind, day, value in plan.entries if value})
        prefix = keys.definition_prefix(project, d.hash)
        written = {(kind, day, p.decode()): value for kind, day, _ in rows
                   for p, value in client.hgetall(keys.summary_rows(prefix, kind, day)).items()}
        assert rows and written == rows


def test_a_backfill_from_the_topic_keeps_a_summarised_definitions_events_in_the_kept_log(client: redis.Redis) -> None:
    """backfill_events.lua for an ordered funnel (flags 's'): each person's events go to its kept log,
    as live's do, and the person is marked dirty; nothing goes to a per-definition string (readers of
    a definition registered since the kept logs do not look there)."""
    from schemas.funnels import parse_funnel_request
    from state.registry import DefinitionRegistry
    from state.store import BackfillRow

    project = Project(client)
    definition = parse_funnel_request({"events": [{"id": "view", "order": 0}, {"id": "buy", "order": 1}]},
                                      project.id, "UTC", []).definition
    h = definition.hash
    assert "s" in definition.flags
    events = [_event("f1", "a", 1000, offset=0), _event("f2", "a", 2000, offset=1), _event("f3", "b", 3000, offset=2)]
    project.apply(events)
    assert DefinitionRegistry(client, 1).bounds(project.id, h, "t1:0") == [3]
    value = '[1,0,""]'
    rows = [BackfillRow(o.offset, o.source, o.hour, o.day, ("", value)) for o in events]
    store = StateStore(client, 1)
    assert store.backfill(definition, "t1:0", store.counted_copies(project.id, "t1", 0, rows)).events == 3
    prefix = keys.definition_prefix(project.id, h)
    summaries = SummaryStore(client, 1)
    for did, mine in (("a", events[:2]), ("b", events[2:])):
        person = project.person(did).decode()
        assert summaries.kept_events(project.id, h, [person]) == [
            "".join(f"{o.ts},20240101,{o.uuid},{len(value)}:{value}" for o in mine).encode()]
        assert client.sismember(keys.summary_dirty(prefix), person)
        assert client.get(keys.person_events(prefix, person)) is None
