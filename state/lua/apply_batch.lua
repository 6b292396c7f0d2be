-- Applies the home part of one project's batch, planned in the dataflow worker
-- (dataflows/operators/batch.py), in one atomic call (state/store.py, StateStore.apply): the events'
-- uuid guards, event names, person-property updates and offsets. What the events add to counts,
-- person sets and definitions goes to their persons' state shards afterwards (apply_shard.lua).
-- The worker decided which events are new from its index of the project's guard log (state/guards.py):
-- A.guards holds their guard records, appended to the log here. That decision holds only if the log
-- has exactly the A.checked records the worker read: otherwise nothing is written and the answer is
-- {-5, bytes in the segment the worker reads}: another worker appended meanwhile (the worker reads the
-- rest and decides again), or Redis lost appends the worker saw (a crash between syncs).
-- Answer: {guards appended, records in the log}. Arguments: the header A; A.batch is a JSON object
-- of sections, each a list of rows named by the layout of the same letter:
--   N  event names (a list of names)
--   U  person-property updates: person, ts, set, set_once, unset (JSON or '')
--   O  offsets:         partition, next offset
local P = ARGV[A.prefix]
-- include: slices.lua
-- include: persons.lua

-- The guard log: segments of GL.segment records of GL.record bytes.
local checked, guards = tonumber(ARGV[A.checked]), ARGV[A.guards]
local segment = math.floor(checked / GL.segment)
local held = redis.call('STRLEN', P .. K.guard_log .. segment)
if held ~= (checked - segment * GL.segment) * GL.record then return {-5, held} end
local batch = cjson.decode(ARGV[A.batch])
local at, from = checked, 1
while from <= #guards do  -- appended to the segment they fall in (a batch may cross a segment's end)
  local s = math.floor(at / GL.segment)
  local part = string.sub(guards, from, from + ((s + 1) * GL.segment - at) * GL.record - 1)
  redis.call('APPEND', P .. K.guard_log .. s, part)
  from, at = from + #part, at + #part / GL.record
end

if #batch.N > 0 then sliced('SADD', P .. K.event_names, batch.N) end

-- Person properties, ordered by event time whatever the order they arrive in (persons.lua): applying
-- one update twice leaves what applying it once does.
for _, u in ipairs(batch.U) do
  apply_props(u[U.person], u[U.set], u[U.set_once], u[U.unset], u[U.ts])
end

-- Offsets of this project applied, per partition.
for _, o in ipairs(batch.O) do
  local part, next_offset = o[O.partition], o[O.next_offset]
  local cur = redis.call('HGET', P .. K.applied, part)
  if not cur or next_offset > tonumber(cur) then redis.call('HSET', P .. K.applied, part, next_offset) end
end

local earliest_ts = batch.earliest
if earliest_ts ~= cjson.null then
  local earliest = redis.call('HGET', P .. K.meta, 'earliest_ms')
  if not earliest or earliest_ts < tonumber(earliest) then
    redis.call('HSET', P .. K.meta, 'earliest_ms', earliest_ts)
  end
end
return {at - checked, at}
