"""Applying planned events to Redis: the only place the dataflow writes project state.

One Lua call applies a batch of one project's events atomically. Each event is guarded by its uuid
(HSETNX in a dedupe bucket), so a replay after a crash, an SDK resend or an overlapping backfill
never applies an event twice: counts may use HINCRBY because the guard and the increment commit
together (ARCHITECTURE rule 2). Every other write is order-insensitive: set membership, minimum
first-seen time, and person properties ordered by event time rather than arrival.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import redis

from schemas.definitions import Definition
from schemas.events import TopicEvent
from state import keys

FIELDS_PER_EVENT = 15

# Helpers shared by the live apply and the backfill: contributions are gathered per key during the
# call and written once per key at its end.
_PRELUDE = r"""
local P = ARGV[1]
local counts, members, bits, values, lists, firsts, appends = {}, {}, {}, {}, {}, {}, {}
local function count(key, field, by)
  local t = counts[key]
  if not t then t = {}; counts[key] = t end
  t[field] = (t[field] or 0) + (by or 1)
end
local function member(key, m)
  local t = members[key]
  if not t then t = {}; members[key] = t end
  t[m] = true
end
-- Person sets are bitmaps indexed by the person's integer id (ids are dense: INCR).
local function mark(key, p)
  local t = bits[key]
  if not t then t = {}; bits[key] = t end
  t[p] = true
end
local function add_value(key, field, v)
  local t = values[key]
  if not t then t = {}; values[key] = t end
  local a = t[field]
  if not a then t[field] = {v, 1, v, v}; return end
  local sum = a[1] + v
  if sum == math.huge or sum == -math.huge or sum ~= sum then
    -- Past a double: Redis sums in long double, so hand it the part so far and go on from v.
    redis.pcall('HINCRBYFLOAT', key, field .. ':s', a[1])
    sum = v
  end
  a[1] = sum; a[2] = a[2] + 1; if v < a[3] then a[3] = v end; if v > a[4] then a[4] = v end
end
local function push(key, v)
  local t = lists[key]
  if not t then t = {}; lists[key] = t end
  t[#t + 1] = v
end

local function append(key, v)
  local t = appends[key]
  if not t then t = {}; appends[key] = t end
  t[#t + 1] = v
end

-- One event's contribution to a definition's state (breakdown value bv, optional numeric v). A
-- funnel ('f') keeps the event itself per day: person, time, uuid and what it matches (v, JSON).
-- One that keeps summaries ('s': ordered funnels, paths) keeps each person's events as
-- `<ts>,<day>,<uuid>,<length of v>:<v>` (`pe:<person>`) and marks the person for the summariser.
local function apply_definition(h, flags, bv, v, p, hour, day, ts, uuid)
  local D = P .. 'd:' .. h .. ':'
  local per_day, per_person = string.find(flags, 'f', 1, true), string.find(flags, 's', 1, true)
  if per_day then push(D .. 'fe:' .. day, p .. '|' .. ts .. '|' .. uuid .. '|' .. v) end
  if per_person then
    append(D .. 'pe:' .. p, ts .. ',' .. day .. ',' .. uuid .. ',' .. #v .. ':' .. v)
    member(D .. 'dirty', p)
  end
  if per_day or per_person then return end
  count(D .. 'ch:' .. bv, hour)
  count(D .. 'cd:' .. bv, day)
  mark(D .. 'ud:' .. bv .. ':' .. day, p)
  mark(D .. 'uh:' .. bv .. ':' .. hour, p)
  member(D .. 'bv', bv)
  if type(v) == 'number' then
    add_value(D .. 'vs:' .. bv, 'h' .. hour, v)
    add_value(D .. 'vs:' .. bv, 'd' .. day, v)
    if string.find(flags, 'l', 1, true) then
      push(D .. 'vl:' .. bv .. ':' .. day, v)
      push(D .. 'vlh:' .. bv .. ':' .. hour, v)
    end
  end
  if string.find(flags, 'a', 1, true) then
    count(D .. 'pa:' .. bv .. ':' .. day, p)
    count(D .. 'pah:' .. bv .. ':' .. hour, p)
  end
end

-- A write to a definition's keys that Redis refuses (a property sum leaving the float range, a
-- person's kept events passing Redis's string limit) fails that definition, not the batch: the
-- caller marks it failed and ingestion goes on. Any other refusal is an error of the state itself.
local failed = {}
local function definition_of(key)
  if string.sub(key, #P + 1, #P + 2) ~= 'd:' then return nil end
  return string.match(key, '^d:(%x+):', #P + 1)
end
local function write(key, ...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    local h = definition_of(key)
    if not h then error(r.err) end
    if not failed[h] then failed[h] = r.err .. ' (writing ' .. string.sub(key, #P + 1) .. ')' end
    return nil
  end
  return r
end

local function flush()
  for key, fields in pairs(counts) do
    for field, c in pairs(fields) do write(key, 'HINCRBY', key, field, c) end
  end
  for key, set in pairs(members) do
    local list = {}
    for m, _ in pairs(set) do list[#list + 1] = m end
    write(key, 'SADD', key, unpack(list))
  end
  for key, set in pairs(bits) do
    for p, _ in pairs(set) do write(key, 'SETBIT', key, p, 1) end
  end
  for key, fields in pairs(values) do
    for field, a in pairs(fields) do
      write(key, 'HINCRBYFLOAT', key, field .. ':s', a[1])
      write(key, 'HINCRBY', key, field .. ':n', a[2])
      local mn = redis.call('HGET', key, field .. ':min')
      if not mn or a[3] < tonumber(mn) then write(key, 'HSET', key, field .. ':min', a[3]) end
      local mx = redis.call('HGET', key, field .. ':max')
      if not mx or a[4] > tonumber(mx) then write(key, 'HSET', key, field .. ':max', a[4]) end
    end
  end
  for key, list in pairs(lists) do write(key, 'RPUSH', key, unpack(list)) end
  for key, list in pairs(appends) do write(key, 'APPEND', key, table.concat(list)) end
end

-- The script's answer: how many events were applied, then (hash, reason) of each definition failed.
local function answer(applied)
  local out = {applied}
  for h, reason in pairs(failed) do out[#out + 1] = h; out[#out + 1] = reason end
  return out
end
"""

APPLY_EVENTS = _PRELUDE + r"""
-- A batch planned with an outdated list of definitions is refused (-1): the caller reloads and
-- retries, so every event applied after a registration carries that definition.
if (redis.call('GET', P .. 'defgen') or '0') ~= ARGV[5] then return {-1} end
local n = tonumber(ARGV[2])
local F = tonumber(ARGV[3])
local defs = cjson.decode(ARGV[4])
local applied = 0
local reached = {}
local names = {}
local earliest_ts = nil
local handed = {}

local function new_person(did)
  local p = redis.call('INCR', P .. 'pseq')
  redis.call('HSET', P .. 'pdi', did, p)
  redis.call('SADD', P .. 'pd:' .. p, did)
  return tostring(p)
end

local function attach(p, did)
  redis.call('HSET', P .. 'pdi', did, p)
  redis.call('SADD', P .. 'pd:' .. p, did)
end

local function merge_into(target, source)
  for _, d in ipairs(redis.call('SMEMBERS', P .. 'pd:' .. source)) do attach(target, d) end
  local props = redis.call('HGETALL', P .. 'pp:' .. source)
  for i = 1, #props, 2 do redis.call('HSETNX', P .. 'pp:' .. target, props[i], props[i + 1]) end
  local times = redis.call('HGETALL', P .. 'pt:' .. source)
  for i = 1, #times, 2 do redis.call('HSETNX', P .. 'pt:' .. target, times[i], times[i + 1]) end
  if redis.call('SREM', P .. 'identified', source) == 1 then redis.call('SADD', P .. 'identified', target) end
  redis.call('DEL', P .. 'pd:' .. source, P .. 'pp:' .. source, P .. 'pt:' .. source)
  redis.call('HSET', P .. 'pmerged', source, target)
end

local function resolve(did, kind, other)
  local a = redis.call('HGET', P .. 'pdi', did)
  if kind == '' then
    if a then return a end
    return new_person(did)
  end
  local b = redis.call('HGET', P .. 'pdi', other)
  local p
  if a and b then
    p = a
    if a ~= b and (kind == 'merge' or redis.call('SISMEMBER', P .. 'identified', b) == 0) then
      merge_into(a, b)
    end
  elseif a then p = a; attach(a, other)
  elseif b then p = b; attach(b, did)
  else p = new_person(did); attach(p, other)
  end
  if kind == 'identify' then redis.call('SADD', P .. 'identified', p) end
  return p
end

-- Person property times: '<ts>' set by $set, 'o<ts>' by $set_once, 'u<ts>' unset.
local function stamp_of(cur)
  if not cur then return nil, nil end
  local c = string.sub(cur, 1, 1)
  if c == 'o' or c == 'u' then return c, tonumber(string.sub(cur, 2)) end
  return 's', tonumber(cur)
end

local function apply_props(p, setj, oncej, unsetj, ts)
  local pp, pt = P .. 'pp:' .. p, P .. 'pt:' .. p
  if setj ~= '' then
    for k, v in pairs(cjson.decode(setj)) do
      local kind, t = stamp_of(redis.call('HGET', pt, k))
      if not kind or kind == 'o' or t <= ts then
        redis.call('HSET', pp, k, v); redis.call('HSET', pt, k, ts)
      end
    end
  end
  if oncej ~= '' then
    for k, v in pairs(cjson.decode(oncej)) do
      local kind, t = stamp_of(redis.call('HGET', pt, k))
      if not kind or (kind == 'o' and ts < t) or (kind == 'u' and ts > t) then
        redis.call('HSET', pp, k, v); redis.call('HSET', pt, k, 'o' .. ts)
      end
    end
  end
  if unsetj ~= '' then
    for _, k in ipairs(cjson.decode(unsetj)) do
      local kind, t = stamp_of(redis.call('HGET', pt, k))
      if not kind or kind == 'o' or t <= ts then
        redis.call('HDEL', pp, k); redis.call('HSET', pt, k, 'u' .. ts)
      end
    end
  end
end

for i = 0, n - 1 do
  local b = 6 + i * F
  local part, off = ARGV[b + 12], tonumber(ARGV[b + 13])
  if not reached[part] or off + 1 > reached[part] then reached[part] = off + 1 end
  -- The guard stores which copy (partition:offset) was applied, so a backfill can tell it apart.
  if redis.call('HSETNX', P .. 'seen:' .. ARGV[b], ARGV[b + 1], ARGV[b + 12] .. ':' .. ARGV[b + 13]) == 1 then
    applied = applied + 1
    local ev, hour, day, ts = ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], tonumber(ARGV[b + 6])
    local p = resolve(ARGV[b + 2], ARGV[b + 7], ARGV[b + 8])
    apply_props(p, ARGV[b + 9], ARGV[b + 10], ARGV[b + 11], ts)
    names[ev] = true
    if not earliest_ts or ts < earliest_ts then earliest_ts = ts end
    count(P .. 'ch:' .. ev, hour)
    count(P .. 'cd:' .. ev, day)
    mark(P .. 'ud:' .. ev .. ':' .. day, p)
    mark(P .. 'uh:' .. ev .. ':' .. hour, p)
    local f = firsts[ev]
    if not f then f = {}; firsts[ev] = f end
    if not f[p] or ts < f[p][1] then f[p] = {ts, hour, day} end
    if ARGV[b + 14] ~= '' then
      for _, c in ipairs(cjson.decode(ARGV[b + 14])) do
        local h = c[1]
        -- Handover: the first offset of each partition this definition was applied live.
        if not handed[h .. ':' .. part] then
          handed[h .. ':' .. part] = true
          redis.call('HSETNX', P .. 'd:' .. h .. ':ho', part, off)
        end
        apply_definition(h, defs[h] or '', c[2], c[3], p, hour, day, ARGV[b + 6], ARGV[b + 1])
      end
    end
  end
end
flush()
-- Offsets of this project applied, per partition, committed with the state (backfill bounds).
for part, next_offset in pairs(reached) do
  local cur = redis.call('HGET', P .. 'applied', part)
  if not cur or next_offset > tonumber(cur) then redis.call('HSET', P .. 'applied', part, next_offset) end
end
-- First time per person and event, stored as 'ts:hour:day' so a late, earlier event can move the
-- person's first-time count from the old buckets to the new ones.
for ev, f in pairs(firsts) do
  local fkey = P .. 'fs:' .. ev
  for p, v in pairs(f) do
    local cur = redis.call('HGET', fkey, p)
    local old_ts, old_hour, old_day
    if cur then
      old_ts, old_hour, old_day = string.match(cur, '^(-?%d+):(-?%d+):(%d+)$')
      old_ts = tonumber(old_ts)
    end
    if not cur or v[1] < old_ts then
      if cur then
        redis.call('HINCRBY', P .. 'fh:' .. ev, old_hour, -1)
        redis.call('HINCRBY', P .. 'fd:' .. ev, old_day, -1)
        redis.call('SETBIT', P .. 'fuh:' .. ev .. ':' .. old_hour, p, 0)
        redis.call('SETBIT', P .. 'fud:' .. ev .. ':' .. old_day, p, 0)
      end
      redis.call('HINCRBY', P .. 'fh:' .. ev, v[2], 1)
      redis.call('HINCRBY', P .. 'fd:' .. ev, v[3], 1)
      redis.call('SETBIT', P .. 'fuh:' .. ev .. ':' .. v[2], p, 1)
      redis.call('SETBIT', P .. 'fud:' .. ev .. ':' .. v[3], p, 1)
      redis.call('HSET', fkey, p, v[1] .. ':' .. v[2] .. ':' .. v[3])
    end
  end
end
for ev, _ in pairs(names) do redis.call('SADD', P .. 'events', ev) end
if earliest_ts then
  local earliest = redis.call('HGET', P .. 'meta', 'earliest_ms')
  if not earliest or earliest_ts < tonumber(earliest) then
    redis.call('HSET', P .. 'meta', 'earliest_ms', earliest_ts)
  end
end
return answer(applied)
"""


# A definition's backfill over one partition's history: applies only the copy of each event the live
# state counted (its guard holds this partition:offset), only below the live handover offset, and
# advances the backfill fence in the same call, so a restarted backfill never applies twice.
BACKFILL_EVENTS = _PRELUDE + r"""
local h, flags, part = ARGV[2], ARGV[3], ARGV[4]
local n = tonumber(ARGV[5])
local D = P .. 'd:' .. h .. ':'
local fence = tonumber(redis.call('HGET', D .. 'bf', part) or '-1')
-- The fence is behind what this process already wrote: Redis lost its last writes (a crash between
-- AOF syncs). Applying on from here would leave a gap, so the caller restarts from the fence.
if fence < tonumber(ARGV[1 + 5 + n * 8]) then return {-2} end
local ho = redis.call('HGET', D .. 'ho', part)
ho = ho and tonumber(ho) or nil
local applied, last = 0, fence
for i = 0, n - 1 do
  local b = 6 + i * 8
  local off = tonumber(ARGV[b + 2])
  if off > fence and (not ho or off < ho) then
    if ARGV[b + 7] ~= '' and redis.call('HGET', P .. 'seen:' .. ARGV[b], ARGV[b + 1]) == part .. ':' .. ARGV[b + 2] then
      local p = redis.call('HGET', P .. 'pdi', ARGV[b + 3])
      if p then
        local c = cjson.decode(ARGV[b + 7])
        apply_definition(h, flags, c[1], c[2], p, ARGV[b + 4], ARGV[b + 5], ARGV[b + 6], ARGV[b + 1])
        applied = applied + 1
      end
    end
  end
  if off > last then last = off end
end
flush()
if last > fence then redis.call('HSET', D .. 'bf', part, last) end
return answer(applied)
"""

# Raise a stored number only (offsets, end offsets): safe to repeat, safe out of order.
RAISE_FIELDS = r"""
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if not cur or tonumber(ARGV[i + 1]) > tonumber(cur) then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""

# Count a dead-lettered record once, however often it is replayed.
COUNT_DLQ = r"""
local added = 0
for i = 1, #ARGV do added = added + redis.call('HSETNX', KEYS[1], ARGV[i], 1) end
if added > 0 then redis.call('HINCRBY', KEYS[2], 'dlq_events', added) end
return added
"""


# A recreated topic: forget its offsets and counted records, keep the dead-letter count.
RESET_STREAM = r"""
local current = redis.call('HGET', KEYS[1], 'topic_id')
if current == ARGV[1] then return 0 end
local dlq = redis.call('HGET', KEYS[1], 'dlq_events')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'topic_id', ARGV[1])
if dlq then redis.call('HSET', KEYS[1], 'dlq_events', dlq) end
return 1
"""


@dataclass
class Applied:
    """What an apply call did: events newly applied, and definitions whose state Redis refused."""

    events: int = 0
    failed: dict[tuple[int, str], str] = field(default_factory=dict)  # (project, hash) -> reason


class RedisLostWrites(RuntimeError):
    """Redis came back without writes this process made (it crashed between AOF syncs): the dataflow
    restarts so its sources resume from the offsets Redis has, and re-apply what was lost."""


def _failures(project_id: int, answer: list[object]) -> dict[tuple[int, str], str]:
    pairs = answer[1:]
    return {(project_id, _text(pairs[i])): _text(pairs[i + 1]) for i in range(0, len(pairs), 2)}


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _json_values(values: dict[str, object]) -> str:
    """Encode each value once, here, so Lua stores PostHog's JSON text untouched."""
    if not values:
        return ""
    return orjson.dumps({str(k): orjson.dumps(v).decode() for k, v in values.items()}).decode()


def _contributions(contributions: list[tuple[str, str, float | None]] | None) -> str:
    if not contributions:
        return ""
    return orjson.dumps([[h, bv, v] if v is not None else [h, bv] for h, bv, v in contributions]).decode()


def event_args(event: TopicEvent, hour: int, day: str, person: Any, partition: int = 0, offset: int = 0,
               contributions: list[tuple[str, str, float | None]] | None = None) -> list[str | int]:
    """The fixed-width argument block of one event for the apply script: the event, its buckets
    (project-zone hour start and day) and its person update (`link_kind`, `other_distinct_id`, `set`,
    `set_once`, `unset`, as `dataflows/operators/persons.py` computes it)."""
    return [
        keys.seen_bucket(event.uuid), event.uuid, event.distinct_id, event.event, hour, day, event.ts_ms,
        person.link_kind or "", person.other_distinct_id or "",
        _json_values(person.set), _json_values(person.set_once),
        orjson.dumps(person.unset).decode() if person.unset else "",
        partition, offset, _contributions(contributions),
    ]


def set_contributions(args: list[str | int], contributions: list[tuple[str, str, float | None]] | None) -> None:
    """Put an event's definition contributions into its encoded block (they are planned per batch)."""
    args[FIELDS_PER_EVENT - 1] = _contributions(contributions)


@dataclass(frozen=True, slots=True)
class BackfillRow:
    """One offset of a partition's history for a definition's backfill."""

    offset: int
    event: TopicEvent | None = None
    hour: int = 0
    day: str = ""
    contribution: tuple[str, float | None] | None = None


@dataclass
class Located:
    """An event with where it sits on the topic and what it contributes to registered definitions."""

    event: TopicEvent
    partition: int = 0
    offset: int = 0
    contributions: list[tuple[str, str, float | None]] | None = None
    args: list[str | int] | None = None  # the encoded argument block, once `event_args` succeeded


@dataclass
class ProjectBatch:
    project_id: int
    tz: ZoneInfo
    events: list[Located]
    flags: dict[str, str] | None = None  # definition hash -> flags, for definitions in this batch
    generation: int = 0  # the project's definitions generation the contributions were planned with


class StaleDefinitions(Exception):
    """A project registered a definition after this batch was planned: plan again."""

    def __init__(self, project_ids: set[int]) -> None:
        super().__init__(f"definitions changed for projects {sorted(project_ids)}")
        self.project_ids = project_ids


class StateStore:
    """Redis-backed insight state for the dataflow."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._apply = client.register_script(APPLY_EVENTS)
        self._raise = client.register_script(RAISE_FIELDS)
        self._count_dlq = client.register_script(COUNT_DLQ)
        self._backfill = client.register_script(BACKFILL_EVENTS)
        self._reset = client.register_script(RESET_STREAM)

    def apply(self, batches: Iterable[ProjectBatch], chunk: int = 2000) -> Applied:
        """Apply each project's events (encoded by `event_args` into `Located.args`, or here)."""
        result = Applied()
        pipe = self.redis.pipeline(transaction=False)
        owners: list[int] = []
        for batch in batches:
            prefix = keys.project_prefix(batch.project_id)
            flags = orjson.dumps(batch.flags or {}).decode()
            for start in range(0, len(batch.events), chunk):
                part = batch.events[start:start + chunk]
                args: list[str | int] = [prefix, len(part), FIELDS_PER_EVENT, flags, batch.generation]
                for item in part:
                    assert item.args is not None, "events are encoded by `event_args` before they are applied"
                    args.extend(item.args)
                self._apply(keys=[keys.distinct_ids(batch.project_id)], args=args, client=pipe)
                owners.append(batch.project_id)
        stale: set[int] = set()
        for owner, answer in zip(owners, pipe.execute() if owners else [], strict=True):
            if int(answer[0]) < 0:
                stale.add(owner)
                continue
            result.events += int(answer[0])
            result.failed.update(_failures(owner, answer))
        if stale:
            raise StaleDefinitions(stale)
        return result

    def backfill(self, definition: Definition, partition: int, items: list[BackfillRow],
                 written_up_to: int = -1) -> Applied:
        """Apply one partition's history to a definition, offset by offset (a row without an event is
        an offset of nothing to apply). `written_up_to` is the last offset this process wrote for it;
        a fence behind it means Redis lost writes (`RedisLostWrites`)."""
        args: list[str | int] = [keys.project_prefix(definition.project_id), definition.hash,
                                 definition.flags, partition, len(items)]
        for row in items:
            if row.event is None or row.contribution is None:
                args += ["", "", row.offset, "", 0, "", 0, ""]
                continue
            event = row.event
            args += [keys.seen_bucket(event.uuid), event.uuid, row.offset, event.distinct_id, row.hour, row.day,
                     event.ts_ms, orjson.dumps(list(row.contribution)).decode()]
        args.append(written_up_to)
        answer = self._backfill(keys=[keys.distinct_ids(definition.project_id)], args=args)
        if int(answer[0]) == -2:
            raise RedisLostWrites(f"the backfill fence of {definition.hash} on partition {partition} is behind "
                                  f"offset {written_up_to}, which this process wrote")
        return Applied(int(answer[0]), _failures(definition.project_id, answer))

    def record_offsets(self, topic: str, applied: dict[int, int], ends: dict[int, int]) -> None:
        args: list[str | int] = []
        for partition, offset in applied.items():
            args += [f"applied:{partition}", offset]
        for partition, offset in ends.items():
            args += [f"end:{partition}", offset]
        if args:
            self._raise(keys=[keys.stream(topic)], args=args)

    def count_dead_letters(self, topic: str, record_ids: Sequence[str]) -> int:
        if not record_ids:
            return 0
        return int(self._count_dlq(keys=[keys.dlq_seen(topic), keys.stream(topic)], args=list(record_ids)))

    def reset_stream(self, topic: str, topic_id: str) -> None:
        """The topic was recreated (Tansu restart, or by hand): its offsets mean something new. The
        dead-letter count is a count of what happened, not of this topic's offsets: it stays."""
        self._reset(keys=[keys.stream(topic), keys.dlq_seen(topic)], args=[topic_id])

    def applied_offsets(self, topic: str, topic_id: str) -> dict[int, int] | None:
        """Partition -> next offset whose events are applied, as Redis has it; None when Redis holds no
        offsets of this topic (a recreated topic, or a Redis that lost or never had them)."""
        stream = self.redis.hgetall(keys.stream(topic))
        if stream.get(b"topic_id", b"").decode() != topic_id:
            return None
        out = {}
        for name_partition, value in stream.items():
            name, _, partition = name_partition.decode().partition(":")
            if name == "applied":
                out[int(partition)] = int(value)
        return out
