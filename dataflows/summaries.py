"""Per-person summaries of funnel and paths definitions: the Redis edge of their pure operators.

The apply script appends each person's kept events (`pe:<person>`) and marks the person dirty in
the same atomic call as the uuid guard, so every counted event reaches the summaries. `summarise`
turns a dirty person's events into its summaries, one hash per project-zone day:

- `fa` (ordered funnels): attempt rows per start day (dataflows/operators/funnel_attempts.py);
  persons with two step events at one instant keep no rows (`irr`): queries run the UDF for them;
- `fb` (ordered funnels broken down by first or last touch): each day's first and last step event
  with a breakdown value;
- `ps` (paths): sessions of two or more events, under every day they touch
  (dataflows/operators/path_sessions.py).

A person's summaries are a function of its stored events only, so writing them is idempotent; a
write is refused when the events grew since they were read (their length is the version), and the
person stays dirty for the next pass.
"""

from __future__ import annotations

import struct
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from dataflows.operators.funnel_attempts import RANK_BITS, PersonEvent, attempt_chains, regular
from dataflows.operators.path_sessions import kept_sessions
from dataflows.services import Letter
from schemas import keys
from schemas.definitions import Breakdown
from schemas.events import in_event_range
from schemas.funnels import MAX_FUNNEL_STEPS, read_kept

# ARGV: definition prefix, persons, then per person: id, version, irregular, replaced, replacement,
# entries, (kind, day, value)*. `replaced` 1: the person's kept events become `replacement` (events the
# summariser could not use were dead-lettered). An empty value removes the person from that day; a
# day's version moves only when its value changes.
WRITE_SUMMARIES = r"""
local D = ARGV[1]
local n = tonumber(ARGV[2])
local i, written = 3, 0
for _ = 1, n do
  local p, version, irregular, replaced, replacement = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4]
  local entries = tonumber(ARGV[i + 5])
  i = i + 6
  if redis.call('STRLEN', D .. 'pe:' .. p) == version then
    if replaced == '1' then
      if replacement == '' then redis.call('DEL', D .. 'pe:' .. p)
      else redis.call('SET', D .. 'pe:' .. p, replacement) end
    end
    for _ = 1, entries do
      local kind, day, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
      i = i + 3
      local key = D .. kind .. ':' .. day
      if value == '' then
        if redis.call('HDEL', key, p) == 1 then redis.call('HINCRBY', D .. kind .. 'v', day, 1) end
      elseif redis.call('HGET', key, p) ~= value then
        redis.call('HSET', key, p, value)
        redis.call('HINCRBY', D .. kind .. 'v', day, 1)
      end
    end
    if irregular == '1' then redis.call('HSET', D .. 'irr', p, 1) else redis.call('HDEL', D .. 'irr', p) end
    redis.call('SREM', D .. 'dirty', p)
    written = written + 1
  else
    i = i + 3 * entries
  end
end
return written
"""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    ts_ms: int
    day: str        # project-zone day, YYYYMMDD
    uuid: str
    value: bytes    # what the event contributes (JSON), as the definition wrote it


def parse_person_events(raw: bytes) -> list[StoredEvent]:
    """A person's stored events (`<ts>,<day>,<uuid>,<length>:<value>` records, back to back)."""
    events, rest = read_person_events(raw)
    if rest:
        raise ValueError(f"unreadable kept events from byte {len(raw) - len(rest)} on")
    return events


def read_person_events(raw: bytes) -> tuple[list[StoredEvent], bytes]:
    """The readable records, and what follows the first unreadable one (b"" when all are read)."""
    out, i, end = [], 0, len(raw)
    while i < end:
        try:
            a = raw.index(b",", i)
            b = raw.index(b",", a + 1)
            c = raw.index(b",", b + 1)
            d = raw.index(b":", c + 1)
            stop = d + 1 + int(raw[c + 1:d])
            if stop > end:
                raise ValueError("record runs past the end")
            out.append(StoredEvent(int(raw[i:a]), raw[a + 1:b].decode(), raw[b + 1:c].decode(), raw[d + 1:stop]))
        except (ValueError, UnicodeDecodeError):
            return out, raw[i:]
        i = stop
    return out, b""


def encode_person_events(events: Iterable[StoredEvent]) -> bytes:
    """The stored form `read_person_events` reads (the apply script appends the same records)."""
    return b"".join(b"%d,%s,%s,%d:%s" % (e.ts_ms, e.day.encode(), e.uuid.encode(), len(e.value), e.value)
                    for e in events)


Entry = tuple[str, str, bytes]  # (summary kind, day, value)


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
    out: list[Entry] = [("fa", day, struct.pack(f"<{len(flat)}q", *flat)) for day, flat in by_day.items()]
    if breakdown is not None:
        touches: dict[str, list[Any]] = {}
        for event, value in sorted(zip(events, values, strict=True), key=lambda p: (p[0].ts_ms, p[0].uuid)):
            if value.steps and any(breakdown.parts(value.breakdown)):
                seen = touches.setdefault(event.day, [event.ts_ms, value.breakdown, event.ts_ms, value.breakdown])
                seen[2:] = [event.ts_ms, value.breakdown]
        out += [("fb", day, orjson.dumps([int(person), *touch])) for day, touch in touches.items()]
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
    return {day: orjson.dumps(found) for day, found in by_day.items()}


def unusable(kind: str, event: StoredEvent) -> str | None:
    """Why a kept event cannot be summarised (kept by an older version, or corrupted), or None."""
    if not in_event_range(event.ts_ms):
        return "its time is outside the range events can have (1900-01-01 .. 2199-12-31 UTC)"
    try:
        if kind == "fa":
            kept = read_kept(event.value)
            if not isinstance(kept.steps, int) or not 0 <= kept.steps < 1 << (MAX_FUNNEL_STEPS + 1):
                return f"its step mask {kept.steps!r} is not one of a funnel of at most {MAX_FUNNEL_STEPS} steps"
        else:
            orjson.loads(event.value)[0]
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


def summarise_person(definition: Any, person: str, raw: bytes) -> PersonSummary:
    """A person's summaries from its kept events. Events that cannot be summarised are dropped (and
    returned to be dead-lettered) rather than stopping the summariser: the rest are summarised."""
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
    try:
        irregular, entries = _entries(definition, person, good)
    except Exception as exc:  # not about one event: none of the person's events can be used
        reason = f"the person's summary failed: {type(exc).__name__}: {exc}"
        dropped += [(_letter_value(definition, person, e), reason, f"{ident}:{e.uuid}") for e in good]
        good, irregular, entries = [], False, []
    if not dropped:
        return PersonSummary(irregular, entries)
    kinds = ("fa", "fb") if kind == "fa" and definition.breakdown is not None else (kind,)
    present = {(k, day) for k, day, _ in entries}
    entries += [(k, e.day, b"") for e in events for k in kinds if (k, e.day) not in present]
    return PersonSummary(irregular, list(dict.fromkeys(entries)), encode_person_events(good), dropped)


def _entries(definition: Any, person: str, events: list[StoredEvent]) -> tuple[bool, list[Entry]]:
    if definition.summary_kind == "fa":
        return funnel_summary(person, events, len(definition.steps), definition.breakdown)
    return False, [("ps", day, value) for day, value in path_summary(events).items()]


def _letter_value(definition: Any, person: str, event: StoredEvent) -> bytes:
    return orjson.dumps({"project_id": definition.project_id, "definition": definition.hash, "person": person,
                         "uuid": event.uuid, "timestamp_ms": event.ts_ms, "day": event.day,
                         "kept": event.value.decode(errors="replace")})


class Summariser:
    """Summarises dirty persons. With `dead_letters` (the dataflow) it drops and dead-letters kept
    events it cannot use; without (queries) it leaves such persons dirty for the dataflow."""

    def __init__(self, client: redis.Redis, dead_letters: Callable[[list[Letter]], None] | None = None) -> None:
        self.redis = client
        self.dead_letters = dead_letters
        self._write = client.register_script(WRITE_SUMMARIES)

    def pending(self, project_id: int, h: str) -> int:
        return int(self.redis.scard(keys.summary_dirty(keys.definition_prefix(project_id, h))))

    def drain(self, definition: Any, budget: int = 5000) -> int:
        """Summarise up to `budget` dirty persons; returns how many were written."""
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        persons = [p.decode() for p in self.redis.srandmember(keys.summary_dirty(prefix), budget)]
        return self.summarise(definition, persons)

    def drain_all(self, definition: Any, rounds: int = 50) -> None:
        """Summarise every dirty person (persons whose events keep moving may stay dirty)."""
        idle = 0
        for _ in range(rounds):
            written = self.drain(definition, 5000)
            if not self.pending(definition.project_id, definition.hash):
                return
            idle = 0 if written else idle + 1
            if idle >= 3:  # what is left keeps moving, or waits for the dataflow to drop bad events
                return

    def summarise(self, definition: Any, persons: Iterable[str], chunk: int = 500) -> int:
        persons = list(persons)
        if not persons:
            return 0
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        raws = self.redis.mget([keys.person_events(prefix, p) for p in persons])
        planned = [(p, raw or b"", summarise_person(definition, p, raw or b"")) for p, raw in
                   zip(persons, raws, strict=True)]
        letters = [Letter(value, f"kept event of definition {definition.hash}: {reason}", rid,
                          {"source": "summariser"})
                   for _, _, plan in planned for value, reason, rid in plan.dropped]
        if letters:
            if self.dead_letters is None:
                planned = [item for item in planned if not item[2].dropped]
            else:
                self.dead_letters(letters)  # before the events leave the person: never lost unrecorded
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(planned), chunk):
            args: list[str | int | bytes] = [prefix, 0]
            for person, raw, plan in planned[start:start + chunk]:
                replaced = plan.replacement is not None
                args += [person, len(raw), int(plan.irregular), int(replaced), plan.replacement or b"",
                         len(plan.entries)]
                for entry in plan.entries:
                    args += entry
                args[1] = int(args[1]) + 1
            self._write(args=args, client=pipe)
        return sum(int(result) for result in pipe.execute())
