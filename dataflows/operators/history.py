"""What archived events add to a counting definition, computed over columns (no I/O).

A backfill from the archive (state/archive.py) does not run each event through the per-event path:
a definition's contribution is evaluated once per distinct (name, values of the event properties
it reads), and for one that reads person properties, per distinct pair of that and the values of
its person properties (a snapshot by distinct_id, passed in); a counting definition's events are
then counted per breakdown value and bucket with array operations, and the events a funnel or paths
keep are written out per day and person as the live batch writes them. The rule applied
is the definition's own `contribution`, so the numbers are the live path's: only how often it runs
changes. Properties the archive keeps as their own columns are read from there; the JSON of an
event is parsed only when one it needs is not (or is not text there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import reduce
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from dataflows.operators.batch import DefinitionSums, add_to_partial_sums
from dataflows.operators.history_summaries import KeptColumns, flat, run_starts
from dataflows.operators.trends import slot_buckets
from schemas.definitions import Definition
from state.records import day_rows, person_records, sized_value

_SEPARATOR = "\x1f"
_ABSENT = "\x1e"  # in a hot column: the event has no such property
Found = tuple[Any, ...]  # (event name, then per key: ('h', text) from a column, ('j', JSON) parsed, None absent)


def _distinct_inputs(table: pa.Table, keys: list[str], hot: set[str]) -> tuple[np.ndarray, list[Found]]:
    """Per row, the index of its distinct (name, values of `keys`), and those distinct inputs."""
    n = table.num_rows
    codes = np.empty(n, dtype=np.int64)
    found: list[Found] = []
    seen: dict[Found, int] = {}
    columns = [table.column("event"), *(_known(table, k) for k in keys if k in hot)]
    fast = np.zeros(n, dtype=bool)
    if all(k in hot for k in keys):  # every input is a column: distinct rows by dictionary encoding
        present = reduce(pc.and_, [pc.is_valid(c) for c in columns])
        fast = np.array(present.to_numpy(zero_copy_only=False), dtype=bool)
        for column in [table.column("event"), *(table.column(k) for k in keys)]:
            for marker in (_SEPARATOR, _ABSENT):  # a text holding one: that row the slow way
                holds = pc.fill_null(pc.match_substring(column, marker), False)
                fast &= ~np.array(holds.to_numpy(zero_copy_only=False), dtype=bool)
        if fast.any():
            rows = np.flatnonzero(fast)
            taken = columns if len(rows) == n else [c.take(rows) for c in columns]
            joined = pc.binary_join_element_wise(*taken, _SEPARATOR)
            encoded = pc.dictionary_encode(joined).combine_chunks()
            codes[rows] = encoded.indices.to_numpy(zero_copy_only=False)
            for text in encoded.dictionary.to_pylist():
                name, *values = text.split(_SEPARATOR)
                key = (name, *(None if v == _ABSENT else ("h", v) for v in values))
                seen[key] = len(found)
                found.append(key)
    slow = np.flatnonzero(~fast)
    if len(slow):
        names = table.column("event").take(slow).to_pylist()
        # Without the JSON column, the reader made sure a null hot value means absent (archive.hot_in_json_only).
        props = (table.column("properties").take(slow).to_pylist() if "properties" in table.column_names
                 else [None] * len(slow))
        hot_values = {k: table.column(k).take(slow).to_pylist() for k in keys if k in hot}
        for i, (name, raw) in enumerate(zip(names, props, strict=True)):
            parts: list[Any] = [name]
            parsed: dict[str, Any] | None = None
            for k in keys:
                text = hot_values[k][i] if k in hot_values else None
                if text is not None:
                    parts.append(("h", text))
                    continue
                if raw is None:
                    parts.append(None)
                    continue
                if parsed is None:
                    parsed = orjson.loads(raw)
                parts.append(("j", orjson.dumps(parsed[k]).decode()) if k in parsed else None)
            key = tuple(parts)
            code = seen.get(key)
            if code is None:
                code = seen[key] = len(found)
                found.append(key)
            codes[slow[i]] = code
    return codes, found


def _known(table: pa.Table, key: str) -> pa.ChunkedArray:
    """A hot column with the rows where the event has no such property at all marked `_ABSENT`, so
    only rows whose value is not text (null, a number, an object) need their JSON parsed. The
    properties JSON is orjson's, which spells a key one way: without `"key":` in it, the key is absent.
    A table read without the JSON was read so because its nulls all mean absent."""
    column = table.column(key)
    if not column.null_count:
        return column
    if "properties" not in table.column_names:
        return pc.fill_null(column, _ABSENT)
    mentioned = pc.match_substring(table.column("properties"), orjson.dumps(key).decode() + ":")
    return pc.if_else(pc.and_(pc.is_null(column), pc.invert(mentioned)), _ABSENT, column)


def _properties(keys: list[str], found: Found) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for k, part in zip(keys, found[1:], strict=True):
        if part is not None:
            props[k] = part[1] if part[0] == "h" else orjson.loads(part[1])
    return props


def sorted_runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(values, return_counts=True)` by one sort: NumPy 2's hashing unique is about 7 times
    slower on integers spread over a wide range (value and person pairs: 62 ms against 8 ms for 187,000)."""
    ordered = np.sort(values)
    starts = np.flatnonzero(run_starts(ordered))
    return ordered[starts], np.diff(np.append(starts, len(ordered)))


def sorted_distinct(values: np.ndarray) -> np.ndarray:
    """`np.unique(values)` (see `sorted_runs`)."""
    return sorted_runs(values)[0]


def _group(values: np.ndarray, persons: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """For values in range(size): (each value present, its rows, the distinct persons of its rows)."""
    counts = np.bincount(values, minlength=size)
    present = np.flatnonzero(counts)
    stride = int(persons.max()) + 1
    pairs = sorted_distinct(values.astype(np.int64) * stride + persons)
    of_value = pairs // stride
    starts = np.searchsorted(of_value, present)
    return present, counts[present], np.split(pairs % stride, starts[1:])


People = dict[str, dict[str, Any]]  # person properties by distinct_id (`person_snapshot`)


def _person_inputs(table: pa.Table, keys: list[str], people: People) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Per row, the index of its person's distinct values of `keys` (by the row's distinct_id), and
    those values (a property the person lacks is left out, as the filters read a missing one)."""
    ids = pc.dictionary_encode(table.column("distinct_id")).combine_chunks()
    seen: dict[bytes, int] = {}
    found: list[dict[str, Any]] = []
    of_id = np.empty(len(ids.dictionary), dtype=np.int64)
    for i, did in enumerate(ids.dictionary.to_pylist()):
        props = people.get(did, {})
        values = {k: props[k] for k in keys if k in props}
        text = orjson.dumps(values, option=orjson.OPT_SORT_KEYS)
        code = seen.get(text)
        if code is None:
            code = seen[text] = len(found)
            found.append(values)
        of_id[i] = code
    return of_id[ids.indices.to_numpy(zero_copy_only=False)], found


def _evaluated(definition: Any, table: pa.Table, now: datetime, hot: set[str], people: People | None = None
               ) -> tuple[pa.Table, np.ndarray, list[tuple[str, Any] | None]]:
    """The rows of the definition's event names, each row's distinct input, and the definition's
    contribution for each distinct input. A definition that reads person properties takes them from
    `people` (by distinct_id): its distinct inputs are (event input, person input) pairs. Raises what
    `contribution` raises."""
    if not definition.uses_person:
        people = None
    elif people is None:
        raise ValueError("a definition that reads person properties is evaluated with them")
    names = definition.event_names()
    if names is not None and table.num_rows:
        wanted = pc.is_in(table.column("event"), pa.array(names))
        if not pc.all(wanted).as_py():  # read for these names already, mostly
            table = table.filter(wanted)
    if table.num_rows == 0:
        return table, np.empty(0, dtype=np.int64), []
    keys = sorted(definition.event_keys())
    codes, found = _distinct_inputs(table, keys, hot)
    if people is None:
        return table, codes, [definition.contribution(inputs[0], _properties(keys, inputs), {}, now)
                              for inputs in found]
    person_of, persons = _person_inputs(table, sorted(definition.person_keys()), people)
    pairs, codes = np.unique(codes * len(persons) + person_of, return_inverse=True)
    return table, codes.reshape(-1), [
        definition.contribution(found[pair // len(persons)][0], _properties(keys, found[pair // len(persons)]),
                                persons[pair % len(persons)], now) for pair in pairs.tolist()]


def kept_values(definition: Any, table: pa.Table, now: datetime, hot: set[str]
                ) -> tuple[pa.Table, np.ndarray, list[str | None]]:
    """The rows of a funnel's event names, each row's distinct input, and what the funnel keeps of
    each distinct input (its kept value as the live batch writes it; None: it keeps nothing)."""
    table, codes, hits = _evaluated(definition, table, now, hot)
    return table, codes, [hit[1] if hit is not None else None for hit in hits]


@dataclass
class KeptHistory:
    """What archived events add to a definition that keeps events, in one state shard: per day the
    funnel's rows (`person|ts|uuid|value`), per person the kept events (`ts,day,uuid,len:value`
    back to back), each in offset order, as the live batch writes them (batch.py); and, for the
    summaries, those kept events as columns and the bytes each person's got."""

    days: dict[str, list[str]] = field(default_factory=dict)
    persons: dict[int, str] = field(default_factory=dict)
    events: int = 0
    columns: KeptColumns | None = None

    @property
    def sizes(self) -> dict[int, int]:
        """The bytes of kept events each person got (the version its summaries are written at)."""
        return {p: len(text.encode()) for p, text in self.persons.items()}


def _grouped(texts: pa.Array, groups: np.ndarray) -> tuple[np.ndarray, pa.Array, list[int]]:
    """Texts sorted by an integer group, each group's in the texts' order (one stable sort): (the
    groups, the sorted texts, each group's row bounds)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    first = np.flatnonzero(run_starts(sorted_groups))
    return sorted_groups[first], flat(texts.take(pa.array(order))), np.append(first, len(order)).tolist()


def _listed_by_group(texts: pa.Array, groups: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    """Each group's texts, as a list."""
    found, ordered, bounds = _grouped(texts, groups)
    rows = ordered.to_pylist()
    return found, [rows[a:b] for a, b in pairwise(bounds)]


def _joined_by_group(texts: pa.Array, groups: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
    """Each group's texts joined: slices of the sorted texts' one buffer, no Python object per text."""
    found, ordered, bounds = _grouped(texts, groups)
    _, offsets_buffer, data = ordered.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[ordered.offset:ordered.offset + len(ordered) + 1]
    raw = data.to_pybytes()[offsets[0]:offsets[-1]] if data is not None else b""
    cut = (offsets[bounds] - offsets[0]).tolist()
    return found, [raw[a:b] for a, b in pairwise(cut)]


def history_kept(definition: Any, table: pa.Table, now: datetime, hot: set[str], shards: int,
                 takes: Callable[[np.ndarray, int], np.ndarray], people: People | None = None
                 ) -> dict[int, KeptHistory]:
    """What the archived rows of `table` (in offset order) add to a `columnar` funnel or paths
    definition, per state shard of their persons; `takes` as for `history_sums`. The records are
    built over columns: one text per row, grouped by person (or day) with one sort."""
    out = {s: KeptHistory() for s in range(shards)}
    table, codes, hits = _evaluated(definition, table, now, hot, people)
    if table.num_rows == 0:
        return out
    per_day, per_person = "f" in definition.flags, "s" in definition.flags
    values = [hit[1] if hit is not None else None for hit in hits]
    kept = np.array([v is not None for v in values], dtype=bool)[codes]
    sized = pa.array([sized_value(v) if v is not None else None for v in values], pa.string())
    value_texts = pa.array(values, pa.string())
    persons = table.column("person").to_numpy()
    offsets = table.column("offset").to_numpy()
    stamps = table.column("timestamp").to_numpy()
    _, day_of, days = slot_buckets(stamps, ZoneInfo(definition.timezone))
    day_texts = pa.array(days, pa.string())
    uuids = table.column("uuid")
    shard_of = persons % shards
    for s in range(shards):
        rows = kept & (shard_of == s)
        rows[rows] = takes(offsets[rows], s)
        where = np.flatnonzero(rows)
        if not len(where):
            continue
        part = out[s]
        part.events = len(where)
        who, when, day, code = persons[where], stamps[where], day_of[where], codes[where]
        stamp_texts, uuid_texts = pc.cast(pa.array(when), pa.string()), flat(uuids.take(pa.array(where)))
        kept_values = value_texts.take(pa.array(code))
        if per_day:
            texts = day_rows(pc.cast(pa.array(who), pa.string()), stamp_texts, uuid_texts, kept_values)
            found, listed = _listed_by_group(texts, day)
            part.days = {days[d]: rows for d, rows in zip(found.tolist(), listed, strict=True)}
        if per_person:
            day_names = day_texts.take(pa.array(day))
            texts = person_records(stamp_texts, day_names, uuid_texts, sized.take(pa.array(code)))
            found, joined = _joined_by_group(texts, who)
            part.persons = {p: text.decode() for p, text in zip(found.tolist(), joined, strict=True)}
            part.columns = KeptColumns(who, when, uuid_texts, day_names, kept_values)
    return out


def history_sums(definition: Definition, table: pa.Table, now: datetime, hot: set[str], shards: int,
                 takes: Callable[[np.ndarray, int], np.ndarray], people: People | None = None
                 ) -> dict[int, DefinitionSums]:
    """What the archived rows of `table` add to a `columnar` counting definition, per state shard of their
    persons; `takes(offsets, shard)` says which rows each shard takes (above its backfill fence,
    below its bound and live handover); `people`: the person properties of its rows' distinct_ids,
    for a definition that reads them. Raises what `contribution` raises."""
    out = {s: DefinitionSums(definition.keep_values, definition.per_actor) for s in range(shards)}
    table, codes, hits = _evaluated(definition, table, now, hot, people)
    if table.num_rows == 0:
        return out
    breakdowns: list[str] = []
    index: dict[str, int] = {}
    outcome = np.full(len(hits), -1, dtype=np.int64)  # breakdown index, -1: does not count
    for i, hit in enumerate(hits):
        if hit is not None:
            bv = hit[0]
            if bv not in index:
                index[bv] = len(breakdowns)
                breakdowns.append(bv)
            outcome[i] = index[bv]
    bv_of = outcome[codes]
    value_of = np.array([hit[1] if hit is not None and hit[1] is not None else np.nan for hit in hits],
                        dtype=np.float64)[codes] if definition.value_property else None
    persons = table.column("person").to_numpy()
    offsets = table.column("offset").to_numpy()
    hours, day_of, days = slot_buckets(table.column("timestamp").to_numpy(), ZoneInfo(definition.timezone))
    shard_of = persons % shards
    for s in range(shards):
        rows = (bv_of >= 0) & (shard_of == s)
        rows[rows] = takes(offsets[rows], s)
        if not rows.any():
            continue
        sums, bv, p = out[s], bv_of[rows], persons[rows]
        hour_list = np.unique(hours[rows])
        for kind, bucket_of, names_of in (("d", day_of[rows], days),
                                          ("h", np.searchsorted(hour_list, hours[rows]), hour_list.tolist())):
            width = len(names_of)
            keys_of = bv * width + bucket_of
            distinct, counts, members = _group(keys_of, p, len(breakdowns) * width)
            for key, n, who in zip(distinct.tolist(), counts.tolist(), members, strict=True):
                b, bucket = breakdowns[key // width], names_of[key % width]
                sums.counts[(kind, b, bucket)] += n
                sums.persons[(kind, b, bucket)] = who  # each key once: its distinct persons, ascending
            if value_of is not None:
                for key, stat in _value_stats(keys_of, value_of[rows], len(breakdowns) * width).items():
                    sums.stats[(breakdowns[key // width], f"{kind}{names_of[key % width]}")] = stat
                if definition.keep_values:
                    for key, values in _listed_values(keys_of, value_of[rows]).items():
                        sums.values[(kind, breakdowns[key // width], names_of[key % width])] = values
            if definition.per_actor:
                for key, actors in _actor_counts(keys_of, p).items():
                    sums.actors[(kind, breakdowns[key // width], names_of[key % width])] = actors
        sums.breakdowns.update(breakdowns[i] for i in np.unique(bv).tolist())
    return out


def _listed_values(keys: np.ndarray, values: np.ndarray) -> dict[int, list[float]]:
    """Per key, its rows' numeric values in row order (quantile maths keep every value)."""
    numeric = ~np.isnan(values)
    keys, values = keys[numeric], values[numeric]
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(run_starts(ordered)).tolist()
    listed = values[order].tolist()
    return {int(ordered[a]): listed[a:b] for a, b in pairwise([*starts, len(order)])}


def _actor_counts(keys: np.ndarray, persons: np.ndarray) -> dict[int, dict[int, int]]:
    """Per key, each person's events among its rows (count-per-actor maths)."""
    if not len(keys):
        return {}
    stride = int(persons.max()) + 1
    distinct, counts = sorted_runs(keys.astype(np.int64) * stride + persons)
    out: dict[int, dict[int, int]] = {}
    for key, person, n in zip((distinct // stride).tolist(), (distinct % stride).tolist(), counts.tolist(),
                              strict=True):
        out.setdefault(key, {})[person] = n
    return out


def _value_stats(keys: np.ndarray, values: np.ndarray, size: int) -> dict[int, list[Any]]:
    """Per key in range(size), [partial sums, count, min, max] of its rows' values (NaN: the event
    has no number there), as `DefinitionSums.add` keeps them: each key's values added in row order
    (`np.bincount` adds its weights in order), a new partial sum where a double would overflow."""
    numeric = ~np.isnan(values)
    keys, values = keys[numeric], values[numeric]
    if not len(keys):
        return {}
    counts = np.bincount(keys, minlength=size)
    totals = np.bincount(keys, weights=values, minlength=size)
    lows, highs = np.full(size, np.inf), np.full(size, -np.inf)
    np.minimum.at(lows, keys, values)
    np.maximum.at(highs, keys, values)
    out: dict[int, list[Any]] = {}
    for key in np.flatnonzero(counts).tolist():
        total = float(totals[key])
        if math.isfinite(total):
            parts = [total]
        else:  # past a double: partial sums, by the live batch's rule
            parts = [0.0]
            for v in values[keys == key].tolist():
                add_to_partial_sums(parts, v)
        out[key] = [parts, int(counts[key]), float(lows[key]), float(highs[key])]
    return out
