"""The live state sink (dataflows/flow.py, `_StatePartition`) against a real Redis and broker."""

from __future__ import annotations

import itertools
import threading
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from dataflows import flow
from dataflows.operators.validate import parse_record
from schemas.events import Record
from schemas.projects import Project
from schemas.settings import Settings
from state import keys
from state.connection import connect
from state.registry import Registry
from state.stream import Stream
from state.topics import ensure_topics
from tests.conftest import Services

pytestmark = pytest.mark.e2e
_projects = itertools.count(920_000)


def _sink(services: Services, partitions: int) -> tuple[Any, Project, Settings]:
    """A new project, and the settings of a state sink on a new topic of `partitions` partitions
    (no archive)."""
    client = connect(services.redis_url)
    project = Registry(client).save_project(next(_projects), token=f"phc_{uuid.uuid4().hex[:8]}")
    topic = f"sink_{uuid.uuid4().hex[:8]}"
    ensure_topics(services.bootstrap, [topic, f"{topic}_dlq"], partitions)
    return client, project, Settings(redis_url=services.redis_url, kafka_bootstrap=services.bootstrap, topic=topic,
                                     dlq_topic=f"{topic}_dlq", archive_dir="")


def test_what_a_batch_shows_behind_it_counts_as_lag_before_the_batch_is_applied(services: Services,
                                                                                   tmp_path: Path) -> None:
    """A backlog's batch takes seconds to apply; meanwhile `/readyz` and the summariser (which waits
    a backlog out) read the lag. The partition's high watermark the batch was fetched with is
    recorded when the batch arrives, so the lag counts everything behind it at once."""
    client, project, settings = _sink(services, 1)
    topic = settings.topic
    partition = flow._StatePartition(settings)
    release = threading.Event()
    apply = partition.applier.apply
    partition.applier.apply = lambda chunk: (release.wait(30), apply(chunk))  # Redis busy with earlier chunks
    try:
        items = [parse_record(Record(0, offset, 5_000, orjson.dumps({
            "uuid": str(uuid.uuid4()), "event": "view", "distinct_id": f"d{offset % 3}",
            "timestamp": "2024-06-01T10:00:00Z", "properties": {}, "project_id": project.id}), None))
            for offset in range(10)]
        partition.write_batch(items)
        stream = Stream(client, topic)
        assert stream.progress().applied == {}  # nothing applied yet
        assert stream.progress().lag() == 5_000  # yet the 4,990 events behind the batch count too
        release.set()
        partition.close()
        assert stream.progress().applied == {0: 10}
        assert stream.progress().lag() == 4_990
    finally:
        release.set()


def test_a_worker_counts_ids_another_worker_merged_under_the_survivor(services: Services) -> None:
    """Two workers of one dataflow: one learns `anon` and `user` as two persons; the other merges them
    ($identify); the first's next event of `anon` counts under the survivor, read from the merge log."""
    client, project, settings = _sink(services, 2)
    first, second = flow._StatePartition(settings, 0, 2), flow._StatePartition(settings, 1, 2)
    offsets = itertools.count()

    def record(partition: int, distinct_id: str, event: str = "view", **properties: str) -> tuple[str, object]:
        event_uuid = str(uuid.uuid4())
        return event_uuid, parse_record(Record(partition, next(offsets), 0, orjson.dumps({
            "uuid": event_uuid, "event": event, "distinct_id": distinct_id, "timestamp": "2024-06-01T10:00:00Z",
            "properties": properties, "project_id": project.id}), None))

    try:
        first.write_batch([record(0, "anon")[1], record(0, "user")[1]])
        first.applier.wait_below(0)
        before = first.persons[project.id]
        assert before.get("anon") != before.get("user")
        second.write_batch([record(1, "user", "$identify", **{"$anon_distinct_id": "anon"})[1]])
        second.applier.wait_below(0)
        survivor = int(client.hget(keys.distinct_ids(project.id), "anon") or 0)
        assert survivor == before.get("user")
        later, item = record(0, "anon")
        first.write_batch([item])
        first.applier.wait_below(0)
        assert first.store.counted_from(project.id, [later])[0][3] == survivor
    finally:
        first.close()
        second.close()
