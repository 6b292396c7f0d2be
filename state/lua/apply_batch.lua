-- Applies the home part of one project's batch, planned in the dataflow worker
-- (dataflows/operators/batch.py), in one atomic call (state/store.py, StateStore.apply): the events'
-- uuid guards, event names, person-property updates and offsets. What the events add to counts,
-- person sets and definitions goes to their persons' state shards afterwards (apply_shard.lua).
-- Every guard is taken first; if any event was already applied from another copy (a resend, an
-- overlapping replay), nothing is written and the answer names those uuids, so the worker plans
-- again without them. A guard holding this very copy is a replay of a batch whose home part was
-- applied: it passes, and the shards' fences tell what they hold. Arguments: the header A; A.batch
-- is a JSON object of sections, each a list of rows named by the layout of the same letter:
--   G  guards:          bucket, uuid, holder (the copy, `topic tag:partition:offset`, then `:person`)
--   N  event names (a list of names)
--   U  person-property updates: person, ts, set, set_once, unset (JSON or '')
--   O  offsets:         partition, next offset
local P = ARGV[A.prefix]
-- include: slices.lua
-- include: persons.lua

local batch = cjson.decode(ARGV[A.batch])

local taken, repeated = {}, {}
for _, g in ipairs(batch.G) do
  local key, uuid, holder = P .. K.seen .. g[G.bucket], g[G.uuid], g[G.holder]
  if redis.call('HSETNX', key, uuid, holder) == 1 then
    taken[#taken + 1] = key; taken[#taken + 1] = uuid
  else
    local held = redis.call('HGET', key, uuid)
    local copy = string.match(holder, '^(.*):')
    if held ~= copy and string.sub(held, 1, #copy + 1) ~= copy .. ':' then repeated[#repeated + 1] = uuid end
  end
end
if #repeated > 0 then
  for i = 1, #taken, 2 do redis.call('HDEL', taken[i], taken[i + 1]) end
  table.insert(repeated, 1, -2)
  return repeated
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
return {#taken / 2}
