"""The Lua scripts of state/lua/, loaded with the key parts and argument layouts they read.

A script never spells a key or an argument position: it reads key parts from `K` and `DK`
(state/keys.py) and arguments by name from its layouts, which the Python that builds the arguments
declares here. A header layout (and a row of a JSON section, `apply_batch.lua`) renders as a Lua
table of 1-based positions; an item layout as a table of offsets plus `<NAME>_FIRST` (the ARGV index
of its first item) and `<NAME>_WIDTH` (the fields per item).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from state import keys
from state.records import GUARD_RECORD

LUA = Path(__file__).with_name("lua")
_INCLUDE = re.compile(r"^-- include: (\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Layout:
    """Named argument fields: header fields are ARGV positions (1-based; also the positions in a row
    of a JSON section); item layouts give offsets within an item that starts `first` into ARGV (or
    after the header when `first` is 0)."""

    name: str
    fields: tuple[str, ...]
    first: int | None = None  # None: a header or JSON row; else the ARGV index of the first item

    def index(self, field: str) -> int:
        return self.fields.index(field)

    def lua(self) -> str:
        if self.first is None:
            entries = ", ".join(f"{f} = {i + 1}" for i, f in enumerate(self.fields))
            return f"local {self.name} = {{{entries}}}\n"
        entries = ", ".join(f"{f} = {i}" for i, f in enumerate(self.fields))
        return (f"local {self.name} = {{{entries}}}\n"
                f"local {self.name}_FIRST, {self.name}_WIDTH = {self.first}, {len(self.fields)}\n")


def _table(name: str, parts: dict[str, str]) -> str:
    entries = ", ".join(f"{n} = '{p}'" for n, p in parts.items())
    return f"local {name} = {{{entries}}}\n"


@dataclass(frozen=True)
class Script:
    """One script file and the layouts of its arguments."""

    file: str
    layouts: tuple[Layout, ...] = ()
    constants: tuple[tuple[str, Callable[[], dict[str, int]]], ...] = ()  # tables of numbers it reads, read when loaded

    def layout(self, name: str) -> Layout:
        return next(layout for layout in self.layouts if layout.name == name)

    @property
    def head(self) -> str:
        """The generated tables: key parts and argument layouts."""
        return (_table("K", keys.PROJECT_PARTS) + _table("DK", keys.DEFINITION_PARTS)
                + "".join(f"local {name} = {{{', '.join(f'{k} = {v}' for k, v in values().items())}}}\n"
                          for name, values in self.constants)
                + "".join(layout.lua() for layout in self.layouts))

    @property
    def body(self) -> str:
        """The script file, its includes in place."""
        return _body(self.file)

    @property
    def source(self) -> str:
        return self.head + self.body


@cache
def _body(file: str) -> str:
    """The file with its includes in place (an included file may include others, each once)."""
    text, seen = (LUA / file).read_text(), set()

    def include(m: re.Match[str]) -> str:
        if m.group(1) in seen:
            return ""
        seen.add(m.group(1))
        return (LUA / m.group(1)).read_text()

    while _INCLUDE.search(text):
        text = _INCLUDE.sub(include, text)
    return text


def _header_then(header: tuple[str, ...], item: tuple[str, ...], trailer: tuple[str, ...] = ()) -> tuple[Layout, ...]:
    layouts = [Layout("A", header), Layout("E", item, first=len(header) + 1)]
    if trailer:
        layouts.append(Layout("T", trailer, first=0))  # offsets after the last item
    return tuple(layouts)


# A live batch of one project, planned by the worker (dataflows/operators/batch.py): the header, and
# the batch as one JSON object whose sections (keyed by letter) are lists of rows named by a layout;
# the home part (apply_batch.lua) and each state shard's part (apply_shard.lua).
HOME_SECTIONS = (
    Layout("U", ("person", "ts", "set", "set_once", "unset")),
    Layout("O", ("partition", "next_offset")),
)
DEFINITION_SECTIONS = (
    Layout("DC", ("definition", "kind", "breakdown", "bucket", "events", "persons")),
    Layout("DV", ("definition", "breakdowns")),
    Layout("DS", ("definition", "breakdown", "field", "sums", "count", "min", "max")),
    Layout("DL", ("definition", "kind", "breakdown", "bucket", "values")),
    Layout("DA", ("definition", "kind", "breakdown", "bucket", "persons")),
    Layout("KD", ("definition", "day", "rows")),
    Layout("KP", ("person", "length", "definitions")),  # the kept blocks: `length` bytes of A.kept, in turn
)
SHARD_SECTIONS = (
    Layout("R", ("fence", "first", "next_offset")),
    Layout("C", ("kind", "event", "bucket", "events")),
    Layout("B", ("kind", "event", "bucket", "persons")),
    Layout("F", ("event", "candidates")),
    Layout("FP", ("person", "ts", "hour", "day")),
    Layout("H", ("definition", "fence", "offset")),
    *DEFINITION_SECTIONS,
)
APPLY_BATCH = Script("apply_batch.lua", (Layout("A", ("prefix", "batch", "checked", "guards")), *HOME_SECTIONS),
                     (("GL", lambda: {"record": GUARD_RECORD.itemsize, "segment": keys.GUARD_SEGMENT_RECORDS}),))
APPLY_SHARD = Script("apply_shard.lua", (Layout("A", ("prefix", "generation", "batch", "kept")), *SHARD_SECTIONS))
FIX_BOUND = Script("fix_bound.lua", (Layout("A", ("prefix", "definition", "fence", "generation")),))

# Events whose persons the worker cannot tell alone: unknown distinct ids and identity links.
PERSON_FIELDS = ("applied", "distinct_id", "link_kind", "link_other")  # applied: '1' or ''

RESOLVE_PERSONS = Script("resolve_persons.lua", _header_then(("prefix", "count"), PERSON_FIELDS))

# One event of a partition's history to apply to a definition in one state shard.
BACKFILL_FIELDS = ("offset", "person", "hour", "day", "ts", "uuid", "contribution")
BACKFILL_EVENTS = Script("backfill_events.lua", _header_then(
    ("prefix", "definition", "flags", "fence", "through", "count"), BACKFILL_FIELDS, ("written_up_to",)))

# A definition's backfill from the archive in one state shard, summed by the worker.
# A.batch's sections, and DB: person sets sent whole (a bitmap in the ARGV at `argument`), ORed in.
BACKFILL_SUMS = Script("backfill_sums.lua", (
    Layout("A", ("prefix", "definition", "fence", "expected", "limit", "through", "written_up_to", "batch", "kept")),
    *DEFINITION_SECTIONS, Layout("DB", ("definition", "kind", "breakdown", "bucket", "argument"))))

# A summarised definition's archived kept events, person by person (backfill_persons.lua).
BACKFILL_PERSONS = Script("backfill_persons.lua", _header_then(
    ("prefix", "definition", "fence", "expected", "limit", "progress", "last", "through", "written_up_to", "count"),
    ("person", "kept")))

RAISE_FIELDS = Script("raise_fields.lua", (Layout("E", ("field", "value"), first=1),))
COUNT_DEAD_LETTERS = Script("count_dead_letters.lua", (Layout("E", ("record",), first=1),))
RESET_STREAM = Script("reset_stream.lua", (Layout("A", ("topic_id", "now_ms", "ends")),))

# A person's summaries: header S, then `entries` entries SE.
SUMMARY_PERSON_FIELDS = ("person", "version", "irregular", "replaced", "replacement", "entries")
SUMMARY_ENTRY_FIELDS = ("kind", "day", "value")
WRITE_SUMMARIES = Script("write_summaries.lua", (
    Layout("A", ("prefix", "log", "count")), Layout("S", SUMMARY_PERSON_FIELDS, first=4),
    Layout("SE", SUMMARY_ENTRY_FIELDS, first=0)))

# Summaries a backfill computed over columns: header A, `persons` persons S, then `days` days SD (a
# day's persons and their values' lengths, comma-separated, and the values back to back).
BACKFILL_SUMMARIES = Script("backfill_summaries.lua", (
    Layout("A", ("prefix", "log", "definition", "persons", "days")),
    Layout("S", ("person", "version", "irregular"), first=6),
    Layout("SD", ("kind", "day", "count", "plain"), first=0)))

ALL = (APPLY_BATCH, APPLY_SHARD, FIX_BOUND, RESOLVE_PERSONS,
       BACKFILL_EVENTS, BACKFILL_SUMS, BACKFILL_PERSONS, RAISE_FIELDS, COUNT_DEAD_LETTERS, RESET_STREAM,
       WRITE_SUMMARIES, BACKFILL_SUMMARIES)
