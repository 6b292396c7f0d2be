"""Per-person summaries of funnel and paths definitions, from a person's kept events (no I/O).

- `fa` (ordered funnels): attempt rows per start day (`funnel_attempts.py`); persons with two step
  events at one instant keep no rows (irregular): queries run the UDF for them;
- `fb` (ordered funnels broken down by first or last touch): each day's first and last step event
  with a breakdown value;
- `ps` (paths): sessions of two or more events, under every day they touch (`path_sessions.py`).

A person's summaries are a function of its kept events only: the dataflow's summariser writes them
(`dataflows/summariser.py`), and a query computes them for persons not summarised yet, so what it
answers includes every applied event without writing anything.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson

from dataflows.operators.funnel_attempts import RANK_BITS, PersonEvent, attempt_chains, regular
from dataflows.operators.history_summaries import by_columns, group_summaries
from dataflows.operators.path_sessions import kept_sessions
from schemas.definitions import Breakdown
from schemas.events import in_event_range
from schemas.funnels import MAX_FUNNEL_STEPS, read_kept
from state.records import (
    StoredEvent,
    encode_person_events,
    encode_sessions,
    encode_touch,
    pack_attempt_rows,
    read_person_events,
)

Entry = tuple[str, str, bytes]  # (summary kind, day, value)
COLUMNS_FROM = 50  # groups from which summarising over columns (history_summaries.py) pays


def funnel_summary(person: str, events: list[StoredEvent], steps: int,
                   breakdown: Breakdown | None = None) -> tuple[bool, list[Entry]]:
    """(irregular, entries): packed int64 attempt rows (person, start, g_2..g_n) per start day
    (`fa`); with a breakdown, the day's first and last step events with a value (`fb`: JSON
    [person, first ms, first value, last ms, last value]) for first/last-touch attribution."""
    values = [read_kept(e.value) for e in events]
    found = [PersonEvent(e.ts_ms, e.uuid, v.steps) for e, v in zip(events, values, strict=True)]
    if not regular(found):
        days = {e.day for e, f in zip(events, found, strict=True) if f.steps}
        return True, [(kind, day, b"") for day in sorted(days) for kind in (("fa", "fb") if breakdown else ("fa",))]
    day_of = {e.ts_ms: e.day for e in events}
    by_day: dict[str, list[int]] = defaultdict(list)
    for row in attempt_chains(found, steps):
        by_day[day_of[row[0] >> RANK_BITS]] += (int(person), *row)
    out: list[Entry] = [("fa", day, pack_attempt_rows(flat)) for day, flat in by_day.items()]
    if breakdown is not None:
        touches: dict[str, list[Any]] = {}
        for event, value in sorted(zip(events, values, strict=True), key=lambda p: (p[0].ts_ms, p[0].uuid)):
            if value.steps and any(breakdown.parts(value.breakdown)):
                seen = touches.setdefault(event.day, [event.ts_ms, value.breakdown, event.ts_ms, value.breakdown])
                seen[2:] = [event.ts_ms, value.breakdown]
        out += [("fb", day, encode_touch(int(person), *touch)) for day, touch in touches.items()]
    return False, out


def path_summary(events: list[StoredEvent]) -> dict[str, bytes]:
    """{day: JSON list of the sessions touching it, each [[ms...], [uuid...], [item...]]}."""
    items = {e.uuid: orjson.loads(e.value)[0] for e in events}
    day_of = {(e.ts_ms, e.uuid): e.day for e in events}
    by_day: dict[str, list[Any]] = defaultdict(list)
    for session in kept_sessions((e.ts_ms, e.uuid, items[e.uuid]) for e in events):
        encoded = [[t for t, _, _ in session], [u for _, u, _ in session], [i for _, _, i in session]]
        for day in dict.fromkeys(day_of[(t, u)] for t, u, _ in session):
            by_day[day].append(encoded)
    return {day: encode_sessions(found) for day, found in by_day.items()}


def unusable(kind: str, event: StoredEvent) -> str | None:
    """Why a kept event cannot be summarised (kept by an older version, or corrupted), or None."""
    if not in_event_range(event.ts_ms):
        return "its time is outside the range events can have (1900-01-01 .. 2199-12-31 UTC)"
    return unusable_value_reason(kind, event.value)


def unusable_value_reason(kind: str, value: bytes) -> str | None:
    """Why a kept value cannot be summarised, or None."""
    try:
        if kind == "fa":
            kept = read_kept(value)
            if not isinstance(kept.steps, int) or not 0 <= kept.steps < 1 << (MAX_FUNNEL_STEPS + 1):
                return f"its step mask {kept.steps!r} is not one of a funnel of at most {MAX_FUNNEL_STEPS} steps"
        else:
            orjson.loads(value)[0]
    except Exception as exc:
        return f"its kept value cannot be read: {type(exc).__name__}: {exc}"
    return None


@dataclass
class PersonSummary:
    """What the summariser writes for one person: entries, and the kept events when some were dropped."""

    irregular: bool
    entries: list[Entry]
    replacement: bytes | None = None  # the person's kept events without the dropped ones
    dropped: list[tuple[bytes, str, str]] = field(default_factory=list)  # (record, reason, id) to dead-letter


def _usable(definition: Any, person: str, raw: bytes
            ) -> tuple[list[StoredEvent], list[StoredEvent], list[tuple[bytes, str, str]]]:
    """(every kept event, those that can be summarised, the rest as letters to dead-letter)."""
    kind = definition.summary_kind
    events, rest = read_person_events(raw)
    dropped: list[tuple[bytes, str, str]] = []
    ident = f"summary:{definition.project_id}:{definition.hash}:{person}"
    if rest:
        dropped.append((rest, "unreadable kept events", f"{ident}:tail:{zlib.crc32(rest)}"))
    good = []
    for event in events:
        reason = unusable(kind, event)
        if reason is None:
            good.append(event)
        else:
            dropped.append((_letter_value(definition, person, event), reason, f"{ident}:{event.uuid}"))
    return events, good, dropped


def summarise_person(definition: Any, person: str, raw: bytes) -> PersonSummary:
    """A person's summaries from its kept events. Events that cannot be summarised are dropped (and
    returned to be dead-lettered) rather than stopping the summariser: the rest are summarised."""
    return summarise_group(definition, person, {person: raw})[person]


def summarise_group(definition: Any, survivor: str, raws: dict[str, bytes]) -> dict[str, PersonSummary]:
    """Summaries of a survivor of merges and of each person merged into it (`raws`: each member's
    kept events): the survivor's are made from the events of the whole group, the others' are
    emptied on every day they kept events of."""
    kinds = ("fa", "fb") if definition.summary_kind == "fa" and definition.breakdown is not None else (
        definition.summary_kind,)
    read = {m: _usable(definition, m, raw) for m, raw in raws.items()}
    good = [e for _, usable, _ in read.values() for e in usable]
    failed: str | None = None
    try:
        irregular, entries = _entries(definition, survivor, good)
    except Exception as exc:  # not about one event: none of the group's events can be used
        failed = f"the person's summary failed: {type(exc).__name__}: {exc}"
        irregular, entries = False, []
    out = {}
    for member, (events, usable, dropped) in read.items():
        ident = f"summary:{definition.project_id}:{definition.hash}:{member}"
        if failed is not None:
            dropped = dropped + [(_letter_value(definition, member, e), failed, f"{ident}:{e.uuid}") for e in usable]
            usable = []
        mine: list[Entry] = entries if member == survivor else []
        if not dropped and member == survivor:
            out[member] = PersonSummary(irregular, mine)
            continue
        present = {(k, day) for k, day, _ in mine}
        mine = list(dict.fromkeys(mine + [(k, e.day, b"") for e in events for k in kinds if (k, e.day) not in present]))
        out[member] = PersonSummary(irregular and member == survivor, mine,
                                    encode_person_events(usable) if dropped else None, dropped)
    return out


def summarise_groups(definition: Any, groups: dict[str, dict[str, bytes]]) -> dict[str, dict[str, PersonSummary]]:
    """`summarise_group` of each group (survivor -> {member: kept events}). Many at once (a backlog
    left them dirty) are summarised over columns (`group_summaries`), byte for byte the same; a group
    holding a record that cannot be used goes group by group, which says what to dead-letter."""
    out: dict[str, dict[str, PersonSummary]] = {}
    rest = groups
    if by_columns(definition) and len(groups) >= COLUMNS_FROM:
        found = group_summaries(definition, {int(s): {int(m): raw for m, raw in raws.items()}
                                             for s, raws in groups.items()},
                                lambda value: unusable_value_reason(definition.summary_kind, value) is None)
        rest = {}
        for survivor, raws in groups.items():
            if int(survivor) in found:
                out[survivor] = {m: PersonSummary(*found[int(m)]) for m in raws}
            else:
                rest[survivor] = raws
    for survivor, raws in rest.items():
        out[survivor] = summarise_group(definition, survivor, raws)
    return out


def _entries(definition: Any, person: str, events: list[StoredEvent]) -> tuple[bool, list[Entry]]:
    if definition.summary_kind == "fa":
        return funnel_summary(person, events, len(definition.steps), definition.breakdown)
    return False, [("ps", day, value) for day, value in path_summary(events).items()]


def _letter_value(definition: Any, person: str, event: StoredEvent) -> bytes:
    return orjson.dumps({"project_id": definition.project_id, "definition": definition.hash, "person": person,
                         "uuid": event.uuid, "timestamp_ms": event.ts_ms, "day": event.day,
                         "kept": event.value.decode(errors="replace")})


