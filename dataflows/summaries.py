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
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from dataflows.operators.funnel_attempts import RANK_BITS, PersonEvent, attempt_chains, regular
from dataflows.operators.path_sessions import kept_sessions
from schemas import keys
from schemas.definitions import Breakdown
from schemas.funnels import read_kept

# ARGV: definition prefix, persons, then per person: id, version, irregular, entries, (kind, day, value)*.
# An empty value removes the person from that day. A day's version moves only when its value changes.
WRITE_SUMMARIES = r"""
local D = ARGV[1]
local n = tonumber(ARGV[2])
local i, written = 3, 0
for _ = 1, n do
  local p, version, irregular, entries = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3])
  i = i + 4
  if redis.call('STRLEN', D .. 'pe:' .. p) == version then
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
    if irregular == '1' then redis.call('HSET', D .. 'irr', p, 1) end
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
    out, i, end = [], 0, len(raw)
    while i < end:
        a = raw.index(b",", i)
        b = raw.index(b",", a + 1)
        c = raw.index(b",", b + 1)
        d = raw.index(b":", c + 1)
        stop = d + 1 + int(raw[c + 1:d])
        out.append(StoredEvent(int(raw[i:a]), raw[a + 1:b].decode(), raw[b + 1:c].decode(), raw[d + 1:stop]))
        i = stop
    return out


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


class Summariser:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
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
        for _ in range(rounds):
            if not self.drain(definition, 5000) and not self.pending(definition.project_id, definition.hash):
                return

    def summarise(self, definition: Any, persons: Iterable[str], chunk: int = 500) -> int:
        persons = list(persons)
        if not persons:
            return 0
        prefix = keys.definition_prefix(definition.project_id, definition.hash)
        raws = self.redis.mget([keys.person_events(prefix, p) for p in persons])
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(persons), chunk):
            args: list[str | int | bytes] = [prefix, 0]
            for person, raw in zip(persons[start:start + chunk], raws[start:start + chunk], strict=True):
                raw = raw or b""
                events = parse_person_events(raw)
                irregular, entries = False, []
                if definition.summary_kind == "fa":
                    irregular, entries = funnel_summary(person, events, len(definition.steps), definition.breakdown)
                else:
                    entries = [("ps", day, value) for day, value in path_summary(events).items()]
                args += [person, len(raw), int(irregular), len(entries)]
                for entry in entries:
                    args += entry
                args[1] = int(args[1]) + 1
            self._write(args=args, client=pipe)
        return sum(int(result) for result in pipe.execute())
