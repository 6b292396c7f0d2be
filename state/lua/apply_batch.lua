-- Applies one project's batch, planned in the dataflow worker (dataflows/operators/batch.py), in one
-- atomic call (state/store.py, StateStore.apply): the events' uuid guards, then what they add, summed
-- per key by the worker. Every guard is taken first; if any event was already applied (a resend or
-- a replay), nothing is written and the answer names those uuids, so the worker plans again without
-- them. Arguments: the header A; A.batch is a JSON object of sections, each a list of rows named by
-- the layout of the same letter:
--   G  guards:          bucket, uuid, copy (partition:offset)
--   C  counts:          kind ('h' hour, 'd' day), event, bucket, events
--   B  person sets:     kind, event, bucket, persons (a list of person ids)
--   F  first times:     event, candidates (a list of FP rows: person, ts, hour, day)
--   N  event names (a list of names)
--   U  person-property updates: person, ts, set, set_once, unset (JSON or '')
--   O  offsets:         partition, next offset
--   H  handovers:       definition, partition, first offset applied live
--   KD kept per day:    definition, day, rows (funnel events, `person|ts|uuid|value`)
--   KP kept per person: definition, person, kept (`ts,day,uuid,len:value` appended)
--   D  contributions:   definition, breakdown, value (number, text or null), person, hour, day, ts,
--                       uuid (applied one by one)
local P = ARGV[A.prefix]
-- include: definition_state.lua
-- include: persons.lua

-- A batch planned with an outdated list of definitions is refused (-1): the caller reloads and
-- retries, so every event applied after a registration carries that definition.
if (redis.call('GET', P .. K.definitions_generation) or '0') ~= ARGV[A.generation] then return {-1} end
local DEFS = cjson.decode(ARGV[A.flags])
local batch = cjson.decode(ARGV[A.batch])

local taken, repeated = {}, {}
for _, g in ipairs(batch.G) do
  local key, uuid = P .. K.seen .. g[G.bucket], g[G.uuid]
  if redis.call('HSETNX', key, uuid, g[G.copy]) == 1 then
    taken[#taken + 1] = key; taken[#taken + 1] = uuid
  else
    repeated[#repeated + 1] = uuid
  end
end
if #repeated > 0 then
  for i = 1, #taken, 2 do redis.call('HDEL', taken[i], taken[i + 1]) end
  table.insert(repeated, 1, -2)
  return repeated
end

-- The replies of a command over a long list, sent in slices (each_slice, definition_state.lua);
-- slices hold an even number of items, so field/value pairs stay together.
local function sliced(command, key, list)
  local replies = {}
  each_slice(list, function(...)
    local r = redis.call(command, key, ...)
    if type(r) == 'table' then for _, v in ipairs(r) do replies[#replies + 1] = v end end
  end)
  return replies
end

local COUNTS = {h = K.hour_counts, d = K.day_counts}
for _, c in ipairs(batch.C) do
  redis.call('HINCRBY', P .. COUNTS[c[C.kind]] .. c[C.event], c[C.bucket], c[C.events])
end

-- Person sets: a bit per person id; several persons of one key in one BITFIELD, in chunks Lua's
-- unpack can take.
local PERSONS = {h = K.hour_persons, d = K.day_persons}
for _, b in ipairs(batch.B) do
  local key, persons = P .. PERSONS[b[B.kind]] .. b[B.event] .. ':' .. b[B.bucket], b[B.persons]
  if #persons == 1 then
    redis.call('SETBIT', key, persons[1], 1)
  else
    local ops = {}
    for _, p in ipairs(persons) do
      ops[#ops + 1] = 'SET'; ops[#ops + 1] = 'u1'; ops[#ops + 1] = p; ops[#ops + 1] = 1
      if #ops >= 4000 then redis.call('BITFIELD', key, unpack(ops)); ops = {} end
    end
    if #ops > 0 then redis.call('BITFIELD', key, unpack(ops)) end
  end
end

-- First time per person and event, stored as 'ts:hour:day' so a later batch holding an earlier
-- event can move the person's first-time count from the old buckets to the new ones.
local moved = {}
local function move(key, field, by)
  local t = moved[key]
  if not t then t = {}; moved[key] = t end
  t[field] = (t[field] or 0) + by
end
for _, f in ipairs(batch.F) do
  local ev, candidates = f[F.event], f[F.candidates]
  local fkey = P .. K.first_seen .. ev
  local fields = {}
  for j, c in ipairs(candidates) do fields[j] = c[FP.person] end
  local current = sliced('HMGET', fkey, fields)
  local updates = {}
  for j, c in ipairs(candidates) do
    local p, ts, hour, day = c[FP.person], c[FP.ts], c[FP.hour], c[FP.day]
    local cur = current[j]
    local old_ts, old_hour, old_day
    if cur then
      old_ts, old_hour, old_day = string.match(cur, '^(-?%d+):(-?%d+):(%d+)$')
      old_ts = tonumber(old_ts)
    end
    if not cur or ts < old_ts then
      if cur then
        move(P .. K.first_time_hour_counts .. ev, old_hour, -1)
        move(P .. K.first_time_day_counts .. ev, old_day, -1)
        redis.call('SETBIT', P .. K.first_time_hour_persons .. ev .. ':' .. old_hour, p, 0)
        redis.call('SETBIT', P .. K.first_time_day_persons .. ev .. ':' .. old_day, p, 0)
      end
      move(P .. K.first_time_hour_counts .. ev, hour, 1)
      move(P .. K.first_time_day_counts .. ev, day, 1)
      redis.call('SETBIT', P .. K.first_time_hour_persons .. ev .. ':' .. hour, p, 1)
      redis.call('SETBIT', P .. K.first_time_day_persons .. ev .. ':' .. day, p, 1)
      updates[#updates + 1] = p; updates[#updates + 1] = ts .. ':' .. hour .. ':' .. day
    end
  end
  if #updates > 0 then sliced('HSET', fkey, updates) end
end
for key, fields in pairs(moved) do
  for field, by in pairs(fields) do
    if by ~= 0 then redis.call('HINCRBY', key, field, by) end
  end
end

if #batch.N > 0 then sliced('SADD', P .. K.event_names, batch.N) end

-- Person properties, ordered by event time whatever the order they arrive in (persons.lua).
for _, u in ipairs(batch.U) do
  apply_props(u[U.person], u[U.set], u[U.set_once], u[U.unset], u[U.ts])
end

-- Offsets of this project applied, per partition, committed with the state (backfill bounds).
for _, o in ipairs(batch.O) do
  local part, next_offset = o[O.partition], o[O.next_offset]
  local cur = redis.call('HGET', P .. K.applied, part)
  if not cur or next_offset > tonumber(cur) then redis.call('HSET', P .. K.applied, part, next_offset) end
end

-- Handover: the first offset of each partition a definition was applied live at.
for _, o in ipairs(batch.H) do
  redis.call('HSETNX', P .. K.definition .. o[H.definition] .. ':' .. DK.handover, o[H.partition], o[H.offset])
end
-- Events kept by funnels (per day) and by summarised definitions (per person, the person marked
-- for the summariser), as the worker wrote them out (dataflows/operators/batch.py).
for _, k in ipairs(batch.KD) do
  local key = P .. K.definition .. k[KD.definition] .. ':' .. DK.day_events .. k[KD.day]
  each_slice(k[KD.rows], function(...) write(key, 'RPUSH', key, ...) end)
end
local dirty = {}
for _, k in ipairs(batch.KP) do
  local h, p = k[KP.definition], k[KP.person]
  local key = P .. K.definition .. h .. ':' .. DK.person_events .. p
  if write(key, 'APPEND', key, k[KP.kept]) then
    local d = dirty[h]
    if not d then d = {}; dirty[h] = d end
    d[#d + 1] = p
  end
end
for h, persons in pairs(dirty) do
  local key = P .. K.definition .. h .. ':' .. DK.dirty
  each_slice(persons, function(...) write(key, 'SADD', key, ...) end)
end
-- Contributions applied one by one: definitions that count (trends, property maths, retention).
for _, d in ipairs(batch.D) do
  local v = d[D.value]
  if v == cjson.null then v = nil end
  apply_definition(d[D.definition], DEFS[d[D.definition]] or '', d[D.breakdown], v, d[D.person], d[D.hour],
    d[D.day], d[D.ts], d[D.uuid])
end
flush()

local earliest_ts = batch.earliest
if earliest_ts ~= cjson.null then
  local earliest = redis.call('HGET', P .. K.meta, 'earliest_ms')
  if not earliest or earliest_ts < tonumber(earliest) then
    redis.call('HSET', P .. K.meta, 'earliest_ms', earliest_ts)
  end
end
return answer(#taken / 2)
