-- Included by resolve_persons.lua: who an event's distinct id is, identity links and person
-- properties. `P` is the project's key prefix; merges made are listed in `merges` (source, target).
local merges = {}

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

-- Person property times: '<ts>' set by $set, 'o<ts>' by $set_once, 'u<ts>' unset.
local function stamp_of(cur)
  if not cur then return nil, nil end
  local c = string.sub(cur, 1, 1)
  if c == 'o' or c == 'u' then return c, tonumber(string.sub(cur, 2)) end
  return 's', tonumber(cur)
end

-- Whether a property stamped (a_kind, a_t) on a merged person replaces the survivor's (b_kind, b_t):
-- the value the two persons' updates give applied in time order, whichever person holds which.
local function replaces(a_kind, a_t, b_kind, b_t)
  if not b_kind then return true end
  if a_kind == 'o' and b_kind == 'o' then return a_t < b_t end
  if a_kind == 'o' then return b_kind == 'u' and a_t > b_t end
  if b_kind == 'o' then return a_kind == 's' or a_t > b_t end
  return a_t > b_t
end

local function merge_into(target, source)
  for _, d in ipairs(redis.call('SMEMBERS', P .. K.person_distinct_ids .. source)) do attach(target, d) end
  local sp, st = P .. K.person_properties .. source, P .. K.person_property_times .. source
  local tp, tt = P .. K.person_properties .. target, P .. K.person_property_times .. target
  local times = redis.call('HGETALL', st)
  for i = 1, #times, 2 do
    local k, stamp = times[i], times[i + 1]
    local a_kind, a_t = stamp_of(stamp)
    local b_kind, b_t = stamp_of(redis.call('HGET', tt, k))
    if replaces(a_kind, a_t, b_kind, b_t) then
      redis.call('HSET', tt, k, stamp)
      local v = redis.call('HGET', sp, k)
      if v then redis.call('HSET', tp, k, v) else redis.call('HDEL', tp, k) end
    end
  end
  if redis.call('SREM', P .. K.identified, source) == 1 then redis.call('SADD', P .. K.identified, target) end
  redis.call('DEL', P .. K.person_distinct_ids .. source, P .. K.person_properties .. source,
    P .. K.person_property_times .. source)
  redis.call('HSET', P .. K.merged, source, target)
  redis.call('RPUSH', P .. K.merge_log, source .. ':' .. target)
  merges[#merges + 1] = source
  merges[#merges + 1] = target
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
