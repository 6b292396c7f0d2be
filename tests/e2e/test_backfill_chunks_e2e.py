"""A backfill from the archive writes a chunk while it evaluates the next (dataflows/definitions.py,
`_BackfillSinkPartition._sum_archived`): against a real Redis, the state it leaves equals the
definition's sums over every event at once, also when a chunk's write does not land (another
worker moved the fence first, Redis dropped the connection) and is evaluated and written again."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from dataflows.definitions import ArchivedSums, _BackfillSinkPartition
from dataflows.operators.history import history_sums
from schemas.definitions import Breakdown, Definition
from schemas.events import TopicEvent
from schemas.filters import parse_filters
from schemas.settings import Settings
from state import keys
from state.archive import HOT_PROPERTIES, ArchivedEvent, table_of
from state.connection import connect
from state.topics import ensure_topics
from tests.conftest import Services

pytestmark = pytest.mark.e2e
_projects = itertools.count(910_000)
NAME = "t0:0"  # the topic partition the chunks come from
CHUNK = 40


def _archived(project_id: int, n: int, seed: int) -> list[ArchivedEvent]:
    rng = random.Random(seed)
    start = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1000)
    return [ArchivedEvent("t0", 0, offset, rng.randrange(1, 30), "2024-06-01",
                          TopicEvent(f"u{offset}", rng.choice(["view", "view", "buy"]), f"d{offset}",
                                     start + rng.randrange(5 * 86_400_000),
                                     {"$browser": rng.choice(["Chrome", "Safari"])}, project_id))
            for offset in range(n)]


def _state(client: redis.Redis, definition: Definition, breakdowns: set[str]) -> dict[str, Any]:
    """Per breakdown value, the day counts and each day's persons, as Redis holds them."""
    prefix = keys.definition_prefix(definition.project_id, definition.hash)
    out: dict[str, Any] = {}
    for b in sorted(breakdowns):
        counts = {k.decode(): int(v) for k, v in client.hgetall(keys.definition_key(prefix, "cd", b)).items()}
        persons = {day: {p for p in range(30) if client.getbit(keys.definition_key(prefix, "ud", b, day), p)}
                   for day in counts}
        out[b] = (counts, persons)
    return out


def _expected(definition: Definition, events: list[ArchivedEvent]) -> dict[str, Any]:
    sums = history_sums(definition, table_of(events), datetime.now(UTC), set(HOT_PROPERTIES), 1,
                        lambda offsets, shard: offsets >= 0)[0]
    out: dict[str, Any] = {}
    for (kind, b, day), n in sums.counts.items():
        if kind == "d":
            counts, persons = out.setdefault(b, ({}, {}))
            counts[day], persons[day] = n, set(sums.persons[(kind, b, day)])
    return out


@pytest.mark.parametrize("trouble", ["none", "fence_moved", "redis_refused", "redis_dropped"])
def test_chunks_written_while_the_next_is_evaluated_equal_one_evaluation(services: Services, trouble: str) -> None:
    ensure_topics(services.bootstrap, ["events", "events_dlq"], 4)
    client = connect(services.redis_url)
    project_id = next(_projects)
    definition = Definition(project_id, "view", parse_filters(None), Breakdown((("event", "$browser"),)))
    client.hset(keys.definitions(project_id), definition.hash, definition.to_json())  # known, not pending
    prefix = keys.definition_prefix(project_id, definition.hash)
    events = _archived(project_id, 10 * CHUNK, seed=len(trouble))
    client.hset(keys.in_shard(keys.backfill_bound(prefix), 0), NAME, len(events))
    sink = _BackfillSinkPartition(Settings(redis_url=services.redis_url, kafka_bootstrap=services.bootstrap))
    prepare = sink.store.backfill_sums_write
    calls = itertools.count()

    def troubled(definition: Any, name: str, sums: Any, limits: Any, through: int, written: int = -1) -> Any:
        """The fourth chunk's write meets trouble: another copy of the task applied its first half
        first, or the connection drops before Redis got the script, or after it ran it."""
        write = prepare(definition, name, sums, limits, through, written)
        if next(calls) != 3 or trouble == "none":
            return write

        def troubled_write() -> Any:
            if trouble == "fence_moved":
                half = history_sums(definition, table.slice(3 * CHUNK, CHUNK // 2), datetime.now(UTC),
                                    set(HOT_PROPERTIES), 1, lambda offsets, shard: offsets > limits[0][0])
                prepare(definition, name, half, limits, 3 * CHUNK + CHUNK // 2 - 1)()
            elif trouble == "redis_refused":
                raise redis.ConnectionError("refused")
            answer = write()
            if trouble == "redis_dropped":
                raise redis.ConnectionError("dropped")
            return answer

        return troubled_write

    table = table_of(events)
    sink.store.backfill_sums_write = troubled  # type: ignore[method-assign]
    overlapped = 0
    try:
        for start in range(0, len(events), CHUNK):
            sink.write_batch([ArchivedSums(project_id, definition.hash, NAME, table.slice(start, CHUNK),
                                           start + CHUNK - 1, start + CHUNK >= len(events))])
            overlapped += sink._pending is not None  # being written on the writer thread
    finally:
        sink.close()
    assert overlapped >= 8 if trouble == "none" else overlapped >= 7  # a chunk after trouble is written at once
    expected = _expected(definition, events)
    assert _state(client, definition, set(expected)) == expected
    assert client.hget(keys.in_shard(keys.backfill_fence(prefix), 0), NAME) == str(len(events) - 1).encode()
