"""The event archive's segments and manifests (state/archive.py), on a temporary directory."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from schemas.events import TopicEvent, parse_topic_event
from state.archive import (
    HOT_PROPERTIES,
    Archive,
    ArchivedEvent,
    ArchiveWriter,
    Manifest,
    contiguous,
    hot_in_json_only,
    partition_rows,
    table_of,
)

pytestmark = pytest.mark.unit
DAY_MS = 86_400_000


def _event(i: int, day: int = 0, **props: object) -> TopicEvent:
    return TopicEvent(f"00000000-0000-4000-8000-{i:012d}", "view" if i % 3 else "buy", f"d{i % 5}",
                      1_700_006_400_000 + day * DAY_MS + i, {"$browser": "Chrome" if i % 2 else "Safari", "n": i,
                                                             **props}, 7)


def _archived(i: int, day: int = 0, partition: int = 0, offset: int | None = None) -> ArchivedEvent:
    event = _event(i, day)
    return ArchivedEvent("t1", partition, i if offset is None else offset, 100 + i % 5,
                         f"2023-11-{15 + day:02d}", event)


def test_a_batch_is_archived_with_its_fences_and_read_back_by_partition_and_offset(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path, worker=0)
    writer.append(7, [_archived(i, partition=i % 2) for i in range(10)], {"t1:0": 9, "t1:1": 10})
    writer.append(7, [], {"t1:0": 15})  # a batch with none of the project's events still moves its fence
    assert (writer.fence(7, "t1", 0), writer.fence(7, "t1", 1), writer.fence(7, "t2", 0)) == (15, 10, 0)
    archive = Archive(tmp_path)
    assert archive.projects() == [7] and archive.fences(7) == {"t1:0": 15, "t1:1": 10}
    table = archive.partition_events(7, "t1", 1, 3, 9)
    assert table.column("offset").to_pylist() == [3, 5, 7]
    assert table.column("person").to_pylist() == [103, 100, 102]
    assert table.column("$browser").to_pylist() == ["Chrome"] * 3
    coverage = archive.coverage(7)
    assert (coverage.events, coverage.days, coverage.first_day, coverage.segments) == (10, 1, "2023-11-15", 1)
    assert coverage.bytes == sum(p.stat().st_size for p in tmp_path.rglob("*.arrow"))


def test_export_is_ndjson_that_replay_reads_back_as_the_same_events(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path)
    events = [_archived(i, day=i % 3) for i in range(12)]
    writer.append(7, events, {"t1:0": 12})
    out = io.BytesIO()
    assert Archive(tmp_path).export(7, out) == 12
    lines = out.getvalue().splitlines()
    back = [parse_topic_event(line) for line in lines]
    assert back == sorted((e.event for e in events), key=lambda e: (e.ts_ms, e.uuid))
    assert orjson.loads(lines[0])["project_id"] == 7


def test_landing_segments_are_compacted_into_one_segment_per_day(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path, compact_after=4)
    expected = []
    for batch in range(9):  # compacted after the 4th and the 8th: days merged with the earlier day segment
        events = [_archived(batch * 10 + i, day=i % 2, offset=batch * 10 + i) for i in range(10)]
        expected += events
        writer.append(7, events, {"t1:0": batch * 10 + 10})
    project = tmp_path / "v1" / "p7"
    files = sorted(str(p.relative_to(project)) for p in project.rglob("w*.*"))
    assert [f.split("/")[0] for f in files] == ["day=2023-11-15", "day=2023-11-16", "landing"]
    assert files[2].endswith(".arrow") and files[0].endswith(".parquet")  # landing: Arrow IPC; days: Parquet
    assert pq.read_table(project / files[0]).num_rows == 40  # 8 batches of 5 events that day
    table = Archive(tmp_path).events(7)
    assert table.column("uuid").to_pylist() == [e.event.uuid for e in sorted(expected, key=lambda e: (
        e.event.ts_ms, e.event.uuid))]
    assert Archive(tmp_path).coverage(7).events == 90


def test_background_compactions_keep_every_event_once_while_batches_go_on(tmp_path: Path) -> None:
    """The dataflow's writer compacts on a thread of its own while batches keep landing: every event
    stays readable exactly once at every moment, and every file is named by the manifest at the end."""
    writer = ArchiveWriter(tmp_path, compact_after=3, background=True)
    reader = Archive(tmp_path)
    expected: list[str] = []
    for batch in range(40):
        events = [_archived(batch * 25 + i, day=i % 3, offset=batch * 25 + i) for i in range(25)]
        expected += [e.event.uuid for e in events]
        writer.append(7, events, {"t1:0": batch * 25 + 25})
        assert sorted(reader.events(7).column("uuid").to_pylist()) == sorted(expected)
    writer.close()
    project = tmp_path / "v1" / "p7"
    named = {s.path for s in Manifest.load(project / "manifest-w0.json").segments}
    assert {str(p.relative_to(project)) for p in project.rglob("w*.*")} == named
    assert any(name.startswith("day=") for name in named)
    assert sorted(reader.events(7).column("uuid").to_pylist()) == sorted(expected)
    assert reader.fences(7) == {"t1:0": 1000}


def test_a_write_a_crash_interrupted_is_removed_and_never_read(tmp_path: Path) -> None:
    """kill -9 between a segment's rename and its manifest: the segment is not in the archive (the
    batch's fence did not move, so the replay appends it again), and the next writer removes it."""
    writer = ArchiveWriter(tmp_path)
    writer.append(7, [_archived(i) for i in range(3)], {"t1:0": 3})
    project = tmp_path / "v1" / "p7"
    before = (project / "manifest-w0.json").read_bytes()
    writer.append(7, [_archived(i) for i in range(3, 6)], {"t1:0": 6})
    (project / "manifest-w0.json").write_bytes(before)  # the manifest of the crashed append never landed
    (project / "landing" / ".w0-9.arrow.abc.tmp").write_bytes(b"partial")
    assert Archive(tmp_path).coverage(7).events == 3
    again = ArchiveWriter(tmp_path)
    assert again.fence(7, "t1", 0) == 3
    again.append(7, [_archived(i) for i in range(3, 6)], {"t1:0": 6})
    assert sorted(p.name for p in (project / "landing").iterdir()) == ["w0-1.arrow", "w0-2.arrow"]
    assert Archive(tmp_path).partition_events(7, "t1", 0, 0, 10).column("offset").to_pylist() == list(range(6))


def test_a_worker_resumes_from_the_fences_another_worker_archived(tmp_path: Path) -> None:
    """A cluster restarted with its partitions spread differently: a worker takes another's fences."""
    ArchiveWriter(tmp_path, worker=1).append(7, [_archived(0, partition=2)], {"t1:2": 40})
    writer = ArchiveWriter(tmp_path, worker=0)
    assert writer.fence(7, "t1", 2) == 40
    writer.append(7, [_archived(50, partition=2)], {"t1:2": 51})
    assert Archive(tmp_path).fences(7) == {"t1:2": 51}
    assert Archive(tmp_path).partition_events(7, "t1", 2, 0, 100).column("offset").to_pylist() == [0, 50]
    shutil.rmtree(tmp_path / "v1" / "p7" / "landing")
    assert Manifest.load(tmp_path / "v1" / "p7" / "manifest-w9.json") == Manifest()


def test_hot_properties_are_their_own_columns_only_when_text() -> None:
    table = table_of([ArchivedEvent("t", 0, 0, 1, "2024-01-01", TopicEvent(
        "u", "e", "d", 0, {"$browser": 3, "$os": "Mac", "x": {"y": 1}}, 1))])
    row = table.to_pylist()[0]
    assert (row["$browser"], row["$os"], orjson.loads(row["properties"])) == (None, "Mac", {
        "$browser": 3, "$os": "Mac", "x": {"y": 1}})


def test_a_hot_property_kept_only_in_the_json_is_marked() -> None:
    """`hot_in_json_only` tells a reader when the hot columns alone would miss a value: a present
    property that is not text. Absent and text values are in the columns; a segment written before
    the mark existed may hold anything."""
    def table(*props: dict[str, object]) -> pa.Table:
        return table_of([ArchivedEvent("t", 0, i, 1, "2024-01-01", TopicEvent(f"u{i}", "e", "d", 0, p, 1))
                         for i, p in enumerate(props)])

    marked = table({"$browser": 3, "$os": "Mac"}, {"$screen_name": None}, {"$os": "Linux", "x": 1})
    assert marked.column("hot_in_json_only").to_pylist() == [1, 1 << HOT_PROPERTIES.index("$screen_name"), 0]
    assert hot_in_json_only(marked, {"$browser"}) and hot_in_json_only(marked, {"$screen_name", "$os"})
    assert not hot_in_json_only(marked, {"$os", "$current_url"}) and not hot_in_json_only(marked, set())
    text = table({"$browser": "Chrome"}, {"plan": 3})
    assert not hot_in_json_only(text, set(HOT_PROPERTIES))
    older = text.set_column(text.schema.get_field_index("hot_in_json_only"), "hot_in_json_only",
                            pa.nulls(2, pa.int16()))
    assert hot_in_json_only(older, {"$browser"})


def test_segments_written_before_the_mark_read_it_as_unknown(tmp_path: Path) -> None:
    """Landing (Arrow) and day (Parquet) segments an earlier version wrote lack `hot_in_json_only`:
    read together with new ones, their rows have it null, so a backfill reads their JSON."""
    writer = ArchiveWriter(tmp_path, compact_after=100)
    writer.append(7, [_archived(i, offset=i) for i in range(3)], {"t1:0": 3})
    writer.append(7, [_archived(i, offset=i) for i in range(3, 5)], {"t1:0": 5})
    landing = tmp_path / "v1" / "p7" / "landing"
    first, second = landing / "w0-1.arrow", landing / "w0-2.arrow"
    feather.write_feather(feather.read_table(first).drop_columns(["hot_in_json_only"]), first)
    pq.write_table(feather.read_table(second).drop_columns(["hot_in_json_only"]), landing / "w0-2.parquet")
    second.unlink()
    manifest = orjson.loads((tmp_path / "v1" / "p7" / "manifest-w0.json").read_bytes())
    manifest["segments"][1]["path"] = "landing/w0-2.parquet"
    (tmp_path / "v1" / "p7" / "manifest-w0.json").write_bytes(orjson.dumps(manifest))
    ArchiveWriter(tmp_path, compact_after=100).append(7, [_archived(5, offset=5)], {"t1:0": 6})
    rows = Archive(tmp_path).event_rows(7, None, ["offset", "hot_in_json_only"]).sort_by("offset")
    assert rows.column("offset").to_pylist() == list(range(6))
    assert rows.column("hot_in_json_only").to_pylist() == [None] * 5 + [0]


def test_a_big_day_segment_is_not_rewritten_for_a_few_new_rows(tmp_path: Path) -> None:
    """Segments of a day grow geometrically: new rows merge with the day's segment only when it is at
    most twice their number, so a busy day is not rewritten whole at every compaction."""
    writer = ArchiveWriter(tmp_path, compact_after=2)
    writer.append(7, [_archived(i, offset=i) for i in range(50)], {"t1:0": 50})
    writer.append(7, [_archived(50 + i, offset=50 + i) for i in range(50)], {"t1:0": 100})  # compacted: 100 rows
    day = tmp_path / "v1" / "p7" / "day=2023-11-15"
    big = sorted(p.name for p in day.iterdir())
    writer.append(7, [_archived(100, offset=100)], {"t1:0": 101})
    writer.append(7, [_archived(101, offset=101)], {"t1:0": 102})  # 2 rows: a segment of their own
    assert set(big) < {p.name for p in day.iterdir()} and len(list(day.iterdir())) == 2
    assert Archive(tmp_path).coverage(7).events == 102
    assert Archive(tmp_path).partition_events(7, "t1", 0, 0, 200).column("offset").to_pylist() == list(range(102))


def test_landing_segments_an_earlier_version_wrote_as_parquet_are_read_and_compacted(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path, compact_after=3)
    writer.append(7, [_archived(i, offset=i) for i in range(4)], {"t1:0": 4})
    project = tmp_path / "v1" / "p7"
    old = project / "landing" / "w0-1.arrow"
    pq.write_table(feather.read_table(old), project / "landing" / "w0-1.parquet")
    old.unlink()
    manifest = orjson.loads((project / "manifest-w0.json").read_bytes())
    manifest["segments"][0]["path"] = "landing/w0-1.parquet"
    (project / "manifest-w0.json").write_bytes(orjson.dumps(manifest))
    again = ArchiveWriter(tmp_path, compact_after=3)
    assert Archive(tmp_path).partition_events(7, "t1", 0, 1, 3).column("offset").to_pylist() == [1, 2]
    again.append(7, [_archived(i, offset=i) for i in range(4, 6)], {"t1:0": 6})
    again.append(7, [_archived(i, offset=i) for i in range(6, 8)], {"t1:0": 8})  # the third: compacted
    assert not list((project / "landing").iterdir())
    assert Archive(tmp_path).partition_events(7, "t1", 0, 0, 10).column("offset").to_pylist() == list(range(8))


def test_a_large_batch_lands_compressed_and_a_small_one_as_it_is(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path)
    writer.append(7, [_archived(i, offset=i) for i in range(2000)], {"t1:0": 2000})
    writer.append(7, [_archived(2000, offset=2000)], {"t1:0": 2001})
    landing = sorted((tmp_path / "v1" / "p7" / "landing").iterdir(), key=lambda p: int(p.stem.split("-")[1]))
    assert [p.name for p in landing] == ["w0-1.arrow", "w0-2.arrow"]
    assert feather.read_table(landing[0]).num_rows == 2000
    assert [_compressed(p) for p in landing] == [True, False]
    assert Archive(tmp_path).partition_events(7, "t1", 0, 1998, 2001).column("offset").to_pylist() == [1998, 1999, 2000]


def _compressed(path: Path) -> bool:
    """Whether an Arrow IPC file is much smaller than the buffers it decodes to."""
    with pa.ipc.open_file(path) as reader:
        decoded = sum(b.size for i in range(reader.num_record_batches)
                      for column in reader.get_batch(i).columns for b in column.buffers() if b is not None)
    return path.stat().st_size < decoded / 2


def test_a_history_read_from_many_segments_is_made_one_chunk_and_gives_the_same_rows() -> None:
    """`contiguous`: taking a backfill's rows from it copies only those rows, and they are the rows
    the segments' chunks held."""
    parts = [pa.table({"topic": ["t"] * 3, "partition": [p, 0, 1], "offset": [5 + i, 9 - i, i],
                       "properties": [f'{{"i":{i}}}', "{}", '{"x":"|"}']}) for i, p in enumerate((0, 1))]
    table = pa.concat_tables(parts)
    assert table.column("properties").num_chunks == 2
    one = contiguous(table)
    assert all(one.column(c).num_chunks == 1 for c in one.column_names)
    rows = partition_rows(one, "t", 0, 0, 10)
    assert one.take(pa.array(rows)).to_pylist() == table.take(pa.array(rows)).to_pylist()
    assert one.take(pa.array(rows)).column("offset").to_pylist() == [5, 8, 9]
