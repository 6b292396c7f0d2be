"""The event archive: every event state counted, as columnar segments on disk (Parquet).

The topic is a buffer; the archive is the history new definitions are built from and the user's own
copy of their events (`insightflow archive`). The dataflow's state sink appends each batch after
Redis applied it, before it records the batch's offsets as applied, so everything state reflects
is archived (what a crash leaves out is read from the topic again: the source resumes from the
offsets recorded).

Layout under the root (`INSIGHTFLOW_ARCHIVE_DIR`), per project:

    v1/p<project>/manifest-w<worker>.json      the segments and fences of one dataflow worker
    v1/p<project>/landing/w<worker>-<n>.arrow    one per batch, any days (Arrow IPC)
    v1/p<project>/day=<YYYY-MM-DD>/w<worker>-<n>.parquet  compacted, one project-zone day

A segment exists once its worker's manifest names it: data files are written first (temp file,
fsync, rename), then the manifest the same way, so a kill -9 at any point leaves either the old or the
new manifest, and files no manifest names are removed when the worker starts again. Each manifest
also records, per `topic tag:partition`, the next offset its batches covered (the fence): an event
below it is archived already, so a replay after a crash appends only what is missing. An event is
archived from the copy state counted (its uuid guard), with the person state counted it for, so
the archive and state agree on every event, resends and replays included.

Why Parquet through pyarrow: columnar and compressed (a few dozen bytes per event), read column by
column and filtered without parsing JSON, and readable by every tool a user has (pandas, DuckDB,
ClickHouse's `file()`), so the archive is their data, not ours. Landing segments, which live only
until the next compaction, are Arrow IPC files instead: a batch of a few events is written and read
back several times faster than as Parquet, and a live stream of small batches writes one per batch.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.feather as feather
import pyarrow.parquet as pq

from schemas.events import TopicEvent
from state import keys

log = logging.getLogger("insightflow.archive")

VERSION = "v1"
# Properties kept as their own string columns as well (the ones breakdowns, filters and paths use
# most): readers filter and group on them without parsing the JSON.
HOT_PROPERTIES = ("$browser", "$os", "$device_type", "$current_url", "$pathname", "$screen_name",
                  "$referring_domain")
HOT_BITS = {name: 1 << i for i, name in enumerate(HOT_PROPERTIES)}  # a hot property's bit in `hot_in_json_only`
_HOT = frozenset(HOT_PROPERTIES)
_READERS = 4  # threads reading landing segments at once (a definition's history: 31 segments 0.6 -> 0.2 s)
COMPACT_AFTER = 32  # landing segments of one worker and project before they are compacted into days
DAY_SEGMENT_ROWS = 1_000_000  # a day's compacted segment takes more rows until it has this many

SCHEMA = pa.schema([
    ("topic", pa.string()),          # topic tag (state/keys.py topic_tag): offsets mean something per topic
    ("partition", pa.int32()),
    ("offset", pa.int64()),
    ("uuid", pa.string()),
    ("event", pa.string()),
    ("distinct_id", pa.string()),
    ("person", pa.int64()),          # the person state counted the event for (merges apply at query time)
    ("timestamp", pa.int64()),       # ms since the epoch, UTC
    ("day", pa.date32()),            # the project-zone day it was bucketed in when archived
    ("properties", pa.string()),     # the event's properties as JSON
    *[(name, pa.string()) for name in HOT_PROPERTIES],
    # HOT_BITS[name] set: that property is present with a value that is not a string, so only the
    # JSON holds it. Null: not known (a segment written before this column), read the JSON to be sure.
    ("hot_in_json_only", pa.int16()),
])
_SEGMENT_NAME = re.compile(r"^w(\d+)-")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ cost 0.74 µs per archived event, this 0.18
class ArchivedEvent:
    """One event as state counted it: its copy on the topic, its person and its day."""

    topic: str
    partition: int
    offset: int
    person: int
    day: str
    event: TopicEvent


@dataclass
class Segment:
    path: str  # relative to the project's directory
    rows: int
    bytes: int
    first_day: str
    last_day: str


@dataclass
class Manifest:
    segments: list[Segment] = field(default_factory=list)
    fences: dict[str, int] = field(default_factory=dict)  # keys.partition_fence -> next offset covered
    seq: int = 0

    def to_json(self) -> bytes:
        # orjson encodes the segment dataclasses itself: a manifest is written with every batch, and
        # dataclasses.asdict's deep copies were most of a small batch's archive cost.
        return orjson.dumps({"version": VERSION, "seq": self.seq, "fences": self.fences, "segments": self.segments})

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            raw = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        return cls([Segment(**s) for s in raw["segments"]], {k: int(v) for k, v in raw["fences"].items()},
                   int(raw["seq"]))


def raise_fences(into: dict[str, int], fences: dict[str, int]) -> dict[str, int]:
    """Fences only move up: each topic partition keeps the highest next offset either names."""
    for name, nxt in fences.items():
        into[name] = max(into.get(name, 0), nxt)
    return into


def _write_atomic(path: Path, data: bytes | None = None, table: pa.Table | None = None) -> int:
    """Write a file so that it exists whole or not at all: temp file, fsync, rename, fsync the folder.
    A table goes as Arrow IPC to a `.arrow` path, else as Parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuidlib.uuid4().hex}.tmp")
    if table is not None:
        if path.suffix == ".arrow":
            # zstd pays from a few dozen rows (a 5 k-event batch: 42 instead of 230 B/event, and faster
            # than Parquet); a live batch of a few events is cheaper to write as it is.
            feather.write_feather(table, tmp, compression="zstd" if table.num_rows >= 64 else "uncompressed")
        else:
            pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    else:
        with open(tmp, "wb") as f:
            f.write(data or b"")
            f.flush()
            os.fsync(f.fileno())
    size = tmp.stat().st_size
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return size


def read_segment(path: Path, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    """One segment's rows (those `filters` keep, in pyarrow's filter form), whichever its format."""
    if path.suffix != ".arrow":
        return pq.read_table(path, columns=columns, filters=filters, schema=SCHEMA)
    read = None
    if columns:  # only the columns asked for and those filtered on: Arrow IPC reads each on its own
        wanted = {*columns, *(f[0] for f in filters or ())}
        with pa.OSFile(str(path)) as source:
            read = [c for c in pa.ipc.open_file(source).schema.names if c in wanted]
    # Mapped, not read: filtering copies only the rows kept (a segment named by a manifest is complete,
    # and one a compaction removes meanwhile stays readable while mapped).
    table = _conformed(feather.read_table(path, columns=read, memory_map=True))
    if filters is not None:
        table = table.filter(pq.filters_to_expression(filters))
    return table.select(columns) if columns else table


def _conformed(table: pa.Table) -> pa.Table:
    """A landing segment with every column of SCHEMA: one written before a column existed gets it as
    nulls (Parquet segments get the same from their reader, given SCHEMA)."""
    for index, column in enumerate(SCHEMA):
        if column.name not in table.column_names:
            table = table.add_column(index, column, pa.nulls(table.num_rows, column.type))
    return table


def table_of(events: list[ArchivedEvent]) -> pa.Table:
    """The segment rows of some events, in one pass over them (a batch's rows are built on the
    dataflow's record thread, beside the worker: 1.6 µs per event, 2.1 µs column by column)."""
    n = len(events)
    days = {d: date.fromisoformat(d) for d in {e.day for e in events}}  # a batch has few days: parse each once
    hot: dict[str, list[str | None]] = {name: [None] * n for name in HOT_PROPERTIES}
    marks = [0] * n  # a hot property held in the JSON only (not text), so its column has no value
    topic, partition, offset, uuid, name, distinct_id, person, timestamp, day, properties = (
        [], [], [], [], [], [], [], [], [], [])
    for row, e in enumerate(events):
        event, props = e.event, e.event.properties
        topic.append(e.topic)
        partition.append(e.partition)
        offset.append(e.offset)
        person.append(e.person)
        day.append(days[e.day])
        uuid.append(event.uuid)
        name.append(event.event)
        distinct_id.append(event.distinct_id)
        timestamp.append(event.ts_ms)
        properties.append(orjson.dumps(props).decode())  # as text: Arrow converts bytes to text 2 µs slower
        for key in _HOT.intersection(props):
            value = props[key]
            if isinstance(value, str):
                hot[key][row] = value
            else:
                marks[row] |= HOT_BITS[key]
    return pa.Table.from_pydict({
        "topic": topic, "partition": partition, "offset": offset, "uuid": uuid, "event": name,
        "distinct_id": distinct_id, "person": person, "timestamp": timestamp, "day": day, "properties": properties,
        **hot, "hot_in_json_only": marks}, schema=SCHEMA)


def hot_in_json_only(table: pa.Table, names: set[str]) -> bool:
    """Whether some row may hold one of these hot properties only in its JSON (a value that is not a
    string), so that a reader of the hot columns alone would miss it. Needs the `hot_in_json_only`
    column; rows of segments written before it count as may."""
    bits = sum(bit for name, bit in HOT_BITS.items() if name in names)
    if not bits or table.num_rows == 0:
        return False
    marks = table.column("hot_in_json_only")
    if marks.null_count:
        return True
    return bool(pc.any(pc.not_equal(pc.bit_wise_and(marks, pa.scalar(bits, pa.int16())), 0)).as_py())


class _Project:
    """One project's folder as one worker sees it."""

    def __init__(self, root: Path, project_id: int) -> None:
        self.dir = root / VERSION / f"p{project_id}"

    def manifests(self) -> list[Path]:
        return sorted(self.dir.glob("manifest-w*.json")) if self.dir.exists() else []

    def manifest_path(self, worker: int) -> Path:
        return self.dir / f"manifest-w{worker}.json"


class ArchiveWriter:
    """Appends one dataflow worker's batches to the archive, and compacts its small segments."""

    def __init__(self, root: Path | str, worker: int = 0, compact_after: int = COMPACT_AFTER,
                 background: bool = False) -> None:
        self.root, self.worker, self.compact_after = Path(root), worker, compact_after
        self._manifests: dict[int, Manifest] = {}
        self._others: dict[int, dict[str, int]] = {}  # fences other workers' manifests hold
        # `background`: compactions run on a thread of their own (the dataflow's: a compaction of
        # 2.5 M rows takes about 10 s the live input would otherwise wait); the lock keeps each
        # manifest write whole against them.
        self._lock = threading.Lock()
        self._compactor = ThreadPoolExecutor(1, thread_name_prefix="archive") if background else None
        self._compacting: set[int] = set()

    def _manifest(self, project_id: int) -> Manifest:
        found = self._manifests.get(project_id)
        if found is None:
            project = _Project(self.root, project_id)
            found = Manifest.load(project.manifest_path(self.worker))
            others: dict[str, int] = {}
            for path in project.manifests():
                if path != project.manifest_path(self.worker):
                    raise_fences(others, Manifest.load(path).fences)
            self._others[project_id] = others
            self._remove_unnamed(project, found)
            self._manifests[project_id] = found
        return found

    def _remove_unnamed(self, project: _Project, manifest: Manifest) -> None:
        """Files of this worker that its manifest does not name: a write a crash interrupted."""
        if not project.dir.exists():
            return
        named = {s.path for s in manifest.segments}
        for path in project.dir.rglob("*"):
            if not path.is_file() or path.name.startswith("manifest-"):
                continue
            rel = str(path.relative_to(project.dir))
            match = _SEGMENT_NAME.match(path.name)
            if path.name.startswith(f".w{self.worker}-") or (
                    match and int(match.group(1)) == self.worker and rel not in named):
                path.unlink(missing_ok=True)

    def fence(self, project_id: int, topic: str, partition: int) -> int:
        """The next offset of the partition whose events of the project are archived (0: none)."""
        name = keys.partition_fence(topic, partition)
        return max(self._manifest(project_id).fences.get(name, 0), self._others[project_id].get(name, 0))

    def append(self, project_id: int, events: list[ArchivedEvent], reached: dict[str, int]) -> None:
        """Archive a batch's events of the project and raise its fences to `reached` (fence name ->
        next offset the batch covered), in one manifest write."""
        table = table_of(events) if events else None
        with self._lock:
            manifest = self._manifest(project_id)
            project = _Project(self.root, project_id)
            fresh = Manifest(list(manifest.segments), dict(manifest.fences), manifest.seq)
            if table is not None:
                fresh.seq += 1
                rel = f"landing/w{self.worker}-{fresh.seq}.arrow"
                size = _write_atomic(project.dir / rel, table=table)
                days = sorted(date.fromisoformat(d).isoformat() for d in {e.day for e in events})  # each day once
                fresh.segments.append(Segment(rel, len(events), size, days[0], days[-1]))
            raise_fences(fresh.fences, reached)
            if fresh.fences == manifest.fences and table is None:
                return
            _write_atomic(project.manifest_path(self.worker), fresh.to_json())
            self._manifests[project_id] = fresh
            due = sum(1 for s in fresh.segments if s.path.startswith("landing/")) >= self.compact_after
            if due and self._compactor is not None:
                if project_id in self._compacting:
                    return
                self._compacting.add(project_id)
        if not due:
            return
        if self._compactor is None:
            self.compact(project_id)
        else:
            self._compactor.submit(self._compact_in_background, project_id)

    def _compact_in_background(self, project_id: int) -> None:
        try:
            self.compact(project_id)
        except Exception:  # its landing segments stay named and are compacted the next time
            log.exception("archive of project %d: compaction failed", project_id)
        finally:
            with self._lock:
                self._compacting.discard(project_id)

    def wait(self) -> None:
        """Until the compactions running or asked for are done (the thread stays)."""
        if self._compactor is not None:
            self._compactor.submit(lambda: None).result()

    def close(self) -> None:
        if self._compactor is not None:
            self._compactor.shutdown(wait=True)

    def compact(self, project_id: int) -> None:
        """Rewrite this worker's landing segments of the project as one segment per day, in one
        manifest write; the replaced files are removed after it. A day's new rows are merged with the
        day's smallest compacted segment of this worker only when that is at most twice as big, so
        segments grow geometrically and a row is rewritten a logarithmic number of times, not at
        every compaction of a busy day."""
        with self._lock:  # what to compact: the landing segments named now (appends go on meanwhile)
            manifest = self._manifest(project_id)
            project = _Project(self.root, project_id)
            landing = [s for s in manifest.segments if s.path.startswith("landing/")]
            compacted = [s for s in manifest.segments if not s.path.startswith("landing/")]
        if not landing:
            return
        began = time.perf_counter()
        table = pa.concat_tables([read_segment(project.dir / s.path) for s in landing])
        days = sorted({d.isoformat() for d in table.column("day").to_pylist()})
        smallest: dict[str, Segment] = {}
        for seg in compacted:
            if seg.first_day in days and seg.rows < DAY_SEGMENT_ROWS:
                if seg.first_day not in smallest or seg.rows < smallest[seg.first_day].rows:
                    smallest[seg.first_day] = seg
        with self._lock:  # names for the new segments, taken from the sequence appends number theirs by
            seq = self._manifests[project_id].seq
            self._manifests[project_id].seq += len(days)
        merged: list[Segment] = []
        written: list[Segment] = []
        for day in days:
            part = table.filter(pc.equal(table.column("day"), pa.scalar(date.fromisoformat(day), pa.date32())))
            earlier = smallest.get(day)
            if earlier is not None and earlier.rows <= 2 * part.num_rows:
                merged.append(earlier)
                part = pa.concat_tables([read_segment(project.dir / earlier.path), part])
            # Not sorted: every reader orders what it reads (segments are concatenated anyway), and
            # sorting a day by (timestamp, uuid) cost more than writing it (bench/README.md).
            seq += 1
            rel = f"day={day}/w{self.worker}-{seq}.parquet"
            size = _write_atomic(project.dir / rel, table=part)
            written.append(Segment(rel, part.num_rows, size, day, day))
        with self._lock:  # one manifest write: the segments named now, less those replaced, plus the new
            current = self._manifests[project_id]
            fresh = Manifest([s for s in current.segments if s not in landing and s not in merged] + written,
                             dict(current.fences), current.seq)
            _write_atomic(project.manifest_path(self.worker), fresh.to_json())
            self._manifests[project_id] = fresh
        for s in [*landing, *merged]:
            (project.dir / s.path).unlink(missing_ok=True)
        log.info("archive of project %d: %d landing segments (%d rows) compacted into %d day segments in %.2f s",
                 project_id, len(landing), table.num_rows, len(days), time.perf_counter() - began)


@dataclass(frozen=True)
class Coverage:
    """What the archive holds of one project."""

    project_id: int
    events: int
    bytes: int
    segments: int
    days: int
    first_day: str | None
    last_day: str | None
    fences: dict[str, int]


class Archive:
    """Reads the archive: its projects, what each covers, and its events (for backfills and export)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def projects(self) -> list[int]:
        base = self.root / VERSION
        if not base.exists():
            return []
        return sorted(int(p.name[1:]) for p in base.iterdir() if p.is_dir() and re.fullmatch(r"p\d+", p.name))

    def totals(self) -> tuple[int, int, int]:
        """(projects, events, bytes) over the whole archive, from the manifests alone."""
        projects = self.projects()
        segments = [s for p in projects for m in self._manifests(p) for s in m.segments]
        return len(projects), sum(s.rows for s in segments), sum(s.bytes for s in segments)

    def _manifests(self, project_id: int) -> list[Manifest]:
        return [Manifest.load(path) for path in _Project(self.root, project_id).manifests()]

    def fences(self, project_id: int) -> dict[str, int]:
        """Per `tag:partition`, the next offset below which the project's events are all archived."""
        out: dict[str, int] = {}
        for manifest in self._manifests(project_id):
            raise_fences(out, manifest.fences)
        return out

    def coverage(self, project_id: int) -> Coverage:
        manifests = self._manifests(project_id)
        segments = [s for m in manifests for s in m.segments]
        table = self._read(project_id, ["day"])
        days = pc.unique(table.column("day")).to_pylist() if table.num_rows else []
        fences: dict[str, int] = {}
        for manifest in manifests:
            raise_fences(fences, manifest.fences)
        return Coverage(project_id, sum(s.rows for s in segments), sum(s.bytes for s in segments), len(segments),
                        len(days), min(days).isoformat() if days else None, max(days).isoformat() if days else None,
                        fences)

    def _read(self, project_id: int, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        """Every segment the manifests name, read consistently: a segment removed by a compaction
        between reading a manifest and opening it means reading the manifests again."""
        project = _Project(self.root, project_id)
        fields = [SCHEMA.field(c) for c in columns] if columns else list(SCHEMA)
        for _ in range(20):
            paths = [project.dir / s.path for m in self._manifests(project_id) for s in m.segments]
            compacted = [str(p) for p in paths if p.suffix == ".parquet"]
            try:
                with ThreadPoolExecutor(_READERS) as readers:  # Arrow reads without the GIL
                    landing = readers.map(lambda p: read_segment(p, columns, filters),
                                          [p for p in paths if p.suffix != ".parquet"])
                    tables = []
                    if compacted:  # one scan over every day segment: their files are read in parallel
                        scan = ds.dataset(compacted, schema=SCHEMA, format="parquet")
                        tables.append(scan.to_table(columns=columns or SCHEMA.names, filter=(
                            pq.filters_to_expression(filters) if filters is not None else None)))
                    tables = [*landing, *tables]
            except FileNotFoundError:
                continue
            if not tables:
                return pa.schema(fields).empty_table()
            return pa.concat_tables(tables)
        raise RuntimeError(f"the archive of project {project_id} kept changing while it was read")

    def partition_events(self, project_id: int, topic: str, partition: int, start: int, stop: int) -> pa.Table:
        """The project's archived events of one topic partition with start <= offset < stop, by offset."""
        filters = [("topic", "=", topic), ("partition", "=", partition), ("offset", ">=", start),
                   ("offset", "<", stop)]
        return self._read(project_id, filters=filters).sort_by("offset")

    def event_rows(self, project_id: int, events: list[str] | None = None, columns: list[str] | None = None
                   ) -> pa.Table:
        """The project's archived events (only these event names, and columns, if given), in no
        particular order: read once for a backfill over every topic partition (`partition_rows`)."""
        return self._read(project_id, columns, [("event", "in", events)] if events else None)

    def definition_rows(self, project_id: int, names: list[str] | None, wanted: set[str], columns: list[str],
                        days: tuple[date, date] | None = None) -> pa.Table:
        """The archived rows a definition reads: its event names (None: all), `columns`, the hot
        properties among `wanted` (the properties it reads) as their own columns, and the JSON too
        when a wanted property may be held there alone (not hot, or in some row not text:
        `hot_in_json_only`); only the project-zone days in `days` (first, last) if given."""
        hot = wanted & set(HOT_PROPERTIES)
        read = [*columns, *sorted(hot)]
        filters = ([("event", "in", names)] if names else []) + (
            [("day", ">=", days[0]), ("day", "<=", days[1])] if days else [])
        table = self._read(project_id, [*read, *(["hot_in_json_only"] if hot else [])], filters or None)
        if wanted - hot or (any(table.column(k).null_count for k in hot) and hot_in_json_only(table, hot)):
            table = self._read(project_id, [*read, "properties"], filters or None)  # some need the JSON
        return table

    def rows(self, project_id: int) -> int:
        """How many events of the project the archive holds (from its manifests)."""
        return sum(s.rows for m in self._manifests(project_id) for s in m.segments)

    def events(self, project_id: int) -> pa.Table:
        """Every archived event of the project, in time order."""
        return self._read(project_id).sort_by([("timestamp", "ascending"), ("uuid", "ascending")])

    def export(self, project_id: int, out: IO[bytes], batch: int = 50_000) -> int:
        """Write the project's events as NDJSON, one topic event per line (what `insightflow replay
        --file` reads back); returns the events written."""
        written = 0
        for event in iter_events(self.events(project_id), project_id, batch):
            out.write(event.to_json() + b"\n")
            written += 1
        return written


def iter_events(table: pa.Table, project_id: int, batch: int = 50_000) -> Iterator[TopicEvent]:
    """The rows of a segment table as topic events."""
    for chunk in table.to_batches(batch):
        cols = chunk.to_pydict()
        for uuid, name, did, ts, props in zip(cols["uuid"], cols["event"], cols["distinct_id"], cols["timestamp"],
                                              cols["properties"], strict=True):
            yield TopicEvent(uuid, name, did, ts, orjson.loads(props), project_id)


def contiguous(table: pa.Table) -> pa.Table:
    """The table with one chunk per column, so that taking rows from it copies only those rows:
    taking from a table of many segments' chunks concatenates every chunk of each string column
    first (about a second per take of a 5 M-row table with its JSON). A table whose text passes what
    one chunk can hold (2 GB) stays as it is."""
    try:
        return table.combine_chunks()
    except (pa.ArrowCapacityError, pa.ArrowInvalid):
        return table


def partition_rows(table: pa.Table, topic: str, partition: int, start: int, stop: int) -> np.ndarray:
    """The indices of the rows of one topic partition with start <= offset < stop, by offset: a
    backfill takes its chunks from them, so the table (with its JSON) is never copied whole."""
    offsets = table.column("offset")
    keep = pc.and_(pc.and_(pc.equal(table.column("topic"), topic), pc.equal(table.column("partition"), partition)),
                   pc.and_(pc.greater_equal(offsets, start), pc.less(offsets, stop)))
    rows = np.flatnonzero(np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool))
    return rows[np.argsort(offsets.to_numpy()[rows], kind="stable")]
