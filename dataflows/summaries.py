"""Attempt summaries of ordered funnels: the Redis edge of `dataflows/operators/funnel_attempts.py`.

The apply script appends each person's step events (`pe:<person>`) and marks the person dirty in
the same atomic call as the uuid guard, so every counted event reaches the summary. `summarise` turns
a dirty person's events into attempt rows, one hash per start day. A person's rows are a function of
its stored events only, so writing them is idempotent; a write is refused when the events grew since
they were read (their length is the version) and the person stays dirty for the next pass. Persons
with two step events at one instant keep no rows: queries run the UDF over their events.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Iterable

import redis

from dataflows.operators.funnel_attempts import RANK_BITS, PersonEvent, attempt_chains, regular
from schemas import keys

# ARGV: definition prefix, persons, then per person: id, version, irregular, days, (day, rows)*.
# Empty rows remove the person from that day. A day's version moves only when its rows change.
WRITE_SUMMARIES = r"""
local D = ARGV[1]
local n = tonumber(ARGV[2])
local i, written = 3, 0
for _ = 1, n do
  local p, version, irregular, days = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3])
  i = i + 4
  if redis.call('STRLEN', D .. 'pe:' .. p) == version then
    for _ = 1, days do
      local day, value = ARGV[i], ARGV[i + 1]
      i = i + 2
      local key = D .. 'fa:' .. day
      if value == '' then
        if redis.call('HDEL', key, p) == 1 then redis.call('HINCRBY', D .. 'fav', day, 1) end
      elseif redis.call('HGET', key, p) ~= value then
        redis.call('HSET', key, p, value)
        redis.call('HINCRBY', D .. 'fav', day, 1)
      end
    end
    if irregular == '1' then redis.call('HSET', D .. 'irr', p, 1) end
    redis.call('SREM', D .. 'dirty', p)
    written = written + 1
  else
    i = i + 2 * days
  end
end
return written
"""


def parse_step_events(raw: bytes) -> tuple[list[PersonEvent], list[str]]:
    """A person's stored step events and the project-zone day of each."""
    events, days = [], []
    for record in raw.decode().split(";"):
        if record:
            ts, mask, day, uuid = record.split(",")
            events.append(PersonEvent(int(ts), uuid, int(mask)))
            days.append(day)
    return events, days


class Summariser:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._write = client.register_script(WRITE_SUMMARIES)

    def pending(self, project_id: int, h: str) -> int:
        return int(self.redis.scard(keys.summary_dirty(keys.definition_prefix(project_id, h))))

    def drain(self, project_id: int, h: str, steps: int, budget: int = 2000) -> int:
        """Summarise up to `budget` dirty persons; returns how many were written."""
        prefix = keys.definition_prefix(project_id, h)
        persons = [p.decode() for p in self.redis.srandmember(keys.summary_dirty(prefix), budget)]
        return self.summarise(prefix, persons, steps)

    def drain_all(self, project_id: int, h: str, steps: int, rounds: int = 50) -> None:
        """Summarise every dirty person (persons whose events keep moving may stay dirty)."""
        for _ in range(rounds):
            if not self.drain(project_id, h, steps, 5000) and not self.pending(project_id, h):
                return

    def summarise(self, prefix: str, persons: Iterable[str], steps: int, chunk: int = 500) -> int:
        persons = list(persons)
        if not persons:
            return 0
        raws = self.redis.mget([keys.person_step_events(prefix, p) for p in persons])
        written = 0
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(persons), chunk):
            args: list[str | int | bytes] = [prefix, 0]
            for person, raw in zip(persons[start:start + chunk], raws[start:start + chunk], strict=True):
                raw = raw or b""
                events, days = parse_step_events(raw)
                day_of = {e.ts_ms: d for e, d in zip(events, days, strict=True)}
                if not regular(events):
                    starts = sorted({d for e, d in zip(events, days, strict=True) if e.steps & 2})
                    args += [person, len(raw), 1, len(starts)]
                    for day in starts:
                        args += [day, ""]
                else:
                    by_day: dict[str, list[tuple[int, ...]]] = defaultdict(list)
                    for row in attempt_chains(events, steps):
                        by_day[day_of[row[1] >> RANK_BITS]].append((int(person), *row))
                    args += [person, len(raw), 0, len(by_day)]
                    for day, rows in by_day.items():
                        flat = [v for row in rows for v in row]
                        args += [day, struct.pack(f"<{len(flat)}q", *flat)]
                args[1] = int(args[1]) + 1
            self._write(args=args, client=pipe)
        for result in pipe.execute():
            written += int(result)
        return written
