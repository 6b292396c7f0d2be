-- Applies a batch of one project's events atomically (state/store.py, StateStore.apply).
-- Arguments: A (header), then A.count events of E_WIDTH fields each, named by E.
local P = ARGV[A.prefix]
-- include: definition_state.lua

-- A batch planned with an outdated list of definitions is refused (-1): the caller reloads and
-- retries, so every event applied after a registration carries that definition.
if (redis.call('GET', P .. K.definitions_generation) or '0') ~= ARGV[A.generation] then return {-1} end
local n = tonumber(ARGV[A.count])
local defs = cjson.decode(ARGV[A.flags])
local applied = 0
local reached = {}
local names = {}
local earliest_ts = nil
local handed = {}

local function new_person(did)
  local p = redis.call('INCR', P .. K.person_seq)
  redis.call('HSET', P .. K.distinct_ids, did, p)
  redis.call('SADD', P .. K.person_distinct_ids .. p, did)
  return tostring(p)
end

local function attach(p, did)
  redis.call('HSET', P .. K.distinct_ids, did, p)
  redis.call('SADD', P .. K.person_distinct_ids .. p, did)
end

local function merge_into(target, source)
  for _, d in ipairs(redis.call('SMEMBERS', P .. K.person_distinct_ids .. source)) do attach(target, d) end
  local props = redis.call('HGETALL', P .. K.person_properties .. source)
  for i = 1, #props, 2 do redis.call('HSETNX', P .. K.person_properties .. target, props[i], props[i + 1]) end
  local times = redis.call('HGETALL', P .. K.person_property_times .. source)
  for i = 1, #times, 2 do redis.call('HSETNX', P .. K.person_property_times .. target, times[i], times[i + 1]) end
  if redis.call('SREM', P .. K.identified, source) == 1 then redis.call('SADD', P .. K.identified, target) end
  redis.call('DEL', P .. K.person_distinct_ids .. source, P .. K.person_properties .. source,
    P .. K.person_property_times .. source)
  redis.call('HSET', P .. K.merged, source, target)
end

-- The person of an event: its distinct id's, linked to `other` by identify, alias or merge (kind).
local function resolve(did, kind, other)
  local a = redis.call('HGET', P .. K.distinct_ids, did)
  if kind == '' then
    if a then return a end
    return new_person(did)
  end
  local b = redis.call('HGET', P .. K.distinct_ids, other)
  local p
  if a and b then
    p = a
    if a ~= b and (kind == 'merge' or redis.call('SISMEMBER', P .. K.identified, b) == 0) then
      merge_into(a, b)
    end
  elseif a then p = a; attach(a, other)
  elseif b then p = b; attach(b, did)
  else p = new_person(did); attach(p, other)
  end
  if kind == 'identify' then redis.call('SADD', P .. K.identified, p) end
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
  local pp, pt = P .. K.person_properties .. p, P .. K.person_property_times .. p
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
  local b = E_FIRST + i * E_WIDTH
  local uuid, part, off = ARGV[b + E.uuid], ARGV[b + E.partition], ARGV[b + E.offset]
  local next_offset = tonumber(off) + 1
  if not reached[part] or next_offset > reached[part] then reached[part] = next_offset end
  -- The guard stores which copy (partition:offset) was applied, so a backfill can tell it apart.
  if redis.call('HSETNX', P .. K.seen .. ARGV[b + E.bucket], uuid, part .. ':' .. off) == 1 then
    applied = applied + 1
    local ev, hour, day = ARGV[b + E.event], ARGV[b + E.hour], ARGV[b + E.day]
    local ts = tonumber(ARGV[b + E.ts])
    local p = resolve(ARGV[b + E.distinct_id], ARGV[b + E.link_kind], ARGV[b + E.link_other])
    apply_props(p, ARGV[b + E.set], ARGV[b + E.set_once], ARGV[b + E.unset], ts)
    names[ev] = true
    if not earliest_ts or ts < earliest_ts then earliest_ts = ts end
    count(P .. K.hour_counts .. ev, hour)
    count(P .. K.day_counts .. ev, day)
    mark(P .. K.day_persons .. ev .. ':' .. day, p)
    mark(P .. K.hour_persons .. ev .. ':' .. hour, p)
    local f = firsts[ev]
    if not f then f = {}; firsts[ev] = f end
    if not f[p] or ts < f[p][1] then f[p] = {ts, hour, day} end
    local contributions = ARGV[b + E.contributions]
    if contributions ~= '' then
      for _, c in ipairs(cjson.decode(contributions)) do
        local h = c[1]
        -- Handover: the first offset of each partition this definition was applied live.
        if not handed[h .. ':' .. part] then
          handed[h .. ':' .. part] = true
          redis.call('HSETNX', P .. K.definition .. h .. ':' .. DK.handover, part, off)
        end
        apply_definition(h, defs[h] or '', c[2], c[3], p, hour, day, ARGV[b + E.ts], uuid)
      end
    end
  end
end
flush()
-- Offsets of this project applied, per partition, committed with the state (backfill bounds).
for part, next_offset in pairs(reached) do
  local cur = redis.call('HGET', P .. K.applied, part)
  if not cur or next_offset > tonumber(cur) then redis.call('HSET', P .. K.applied, part, next_offset) end
end
-- First time per person and event, stored as 'ts:hour:day' so a late, earlier event can move the
-- person's first-time count from the old buckets to the new ones.
for ev, f in pairs(firsts) do
  local fkey = P .. K.first_seen .. ev
  for p, v in pairs(f) do
    local cur = redis.call('HGET', fkey, p)
    local old_ts, old_hour, old_day
    if cur then
      old_ts, old_hour, old_day = string.match(cur, '^(-?%d+):(-?%d+):(%d+)$')
      old_ts = tonumber(old_ts)
    end
    if not cur or v[1] < old_ts then
      if cur then
        redis.call('HINCRBY', P .. K.first_time_hour_counts .. ev, old_hour, -1)
        redis.call('HINCRBY', P .. K.first_time_day_counts .. ev, old_day, -1)
        redis.call('SETBIT', P .. K.first_time_hour_persons .. ev .. ':' .. old_hour, p, 0)
        redis.call('SETBIT', P .. K.first_time_day_persons .. ev .. ':' .. old_day, p, 0)
      end
      redis.call('HINCRBY', P .. K.first_time_hour_counts .. ev, v[2], 1)
      redis.call('HINCRBY', P .. K.first_time_day_counts .. ev, v[3], 1)
      redis.call('SETBIT', P .. K.first_time_hour_persons .. ev .. ':' .. v[2], p, 1)
      redis.call('SETBIT', P .. K.first_time_day_persons .. ev .. ':' .. v[3], p, 1)
      redis.call('HSET', fkey, p, v[1] .. ':' .. v[2] .. ':' .. v[3])
    end
  end
end
for ev, _ in pairs(names) do redis.call('SADD', P .. K.event_names, ev) end
if earliest_ts then
  local earliest = redis.call('HGET', P .. K.meta, 'earliest_ms')
  if not earliest or earliest_ts < tonumber(earliest) then
    redis.call('HSET', P .. K.meta, 'earliest_ms', earliest_ts)
  end
end
return answer(applied)
