-- Included by apply_shard.lua and backfill_events.lua: contributions are gathered per key during
-- the call and written once per key at its end. `P` is the project's key prefix.
-- include: slices.lua
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
-- Records of definition h to append to a person's kept log (key), each an append of its own.
local function append(key, h, records)
  local t = appends[key]
  if not t then t = {definitions = {h}}; appends[key] = t end
  t[#t + 1] = h .. ',' .. #records .. ';' .. records
end

-- One event's contribution to a definition's state (breakdown value bv, optional numeric v). A
-- funnel ('f') keeps the event itself per day: person, time, uuid and what it matches (v, JSON).
-- One that keeps summaries ('s': ordered funnels, paths) keeps each person's events in its kept log
-- as `<ts>,<day>,<uuid>,<length of v>:<v>` (state/records.py) and marks the person for the summariser.
local function apply_definition(h, flags, bv, v, p, hour, day, ts, uuid)
  local D = P .. K.definition .. h .. ':'
  local per_day, per_person = string.find(flags, 'f', 1, true), string.find(flags, 's', 1, true)
  if per_day then push(D .. DK.day_events .. day, p .. '|' .. ts .. '|' .. uuid .. '|' .. v) end
  if per_person then
    append(P .. K.kept_log .. p, h, ts .. ',' .. day .. ',' .. uuid .. ',' .. #v .. ':' .. v)
    member(D .. DK.dirty, p)
  end
  if per_day or per_person then return end
  count(D .. DK.hour_counts .. bv, hour)
  count(D .. DK.day_counts .. bv, day)
  mark(D .. DK.day_persons .. bv .. ':' .. day, p)
  mark(D .. DK.hour_persons .. bv .. ':' .. hour, p)
  member(D .. DK.breakdown_values, bv)
  if type(v) == 'number' then
    add_value(D .. DK.value_stats .. bv, 'h' .. hour, v)
    add_value(D .. DK.value_stats .. bv, 'd' .. day, v)
    if string.find(flags, 'l', 1, true) then
      push(D .. DK.day_values .. bv .. ':' .. day, v)
      push(D .. DK.hour_values .. bv .. ':' .. hour, v)
    end
  end
  if string.find(flags, 'a', 1, true) then
    count(D .. DK.day_person_events .. bv .. ':' .. day, p)
    count(D .. DK.hour_person_events .. bv .. ':' .. hour, p)
  end
end

-- Where a definition's backfill stops on a topic partition in this shard (its definition prefix D):
-- below its bound, or below the live handover if that is lower.
local function backfill_limit(D, part)
  local limit = tonumber(redis.call('HGET', D .. DK.backfill_bound, part) or '0')
  local ho = redis.call('HGET', D .. DK.handover, part)
  if ho and tonumber(ho) < limit then limit = tonumber(ho) end
  return limit
end

-- A write to a definition's keys that Redis refuses (a property sum leaving the float range, a
-- person's kept events passing Redis's string limit) fails that definition, not the batch: the
-- caller marks it failed and ingestion goes on. Any other refusal is an error of the state itself.
local failed = {}
local DP = P .. K.definition
local function definition_of(key)
  if string.sub(key, 1, #DP) ~= DP then return nil end
  return string.match(key, '^(%x+):', #DP + 1)
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

-- Appends to a person's kept log (K.kept_log) an append holding the records of the definitions
-- listed; a refusal (the string limit) fails each of them.
local function append_kept(key, records, definitions)
  local r = redis.pcall('APPEND', key, records)
  if type(r) == 'table' and r.err then
    for _, h in ipairs(definitions) do
      if not failed[h] then failed[h] = r.err .. ' (writing ' .. string.sub(key, #P + 1) .. ')' end
    end
    return nil
  end
  return r
end

-- Marks persons in a person-set bitmap (or clears them: value '0'): one BITFIELD per 1,000 persons
-- (what Lua's unpack takes), or a SETBIT for a single person (cheaper to parse).
local function set_bits(key, persons, value)
  value = value or '1'
  if #persons == 1 then write(key, 'SETBIT', key, persons[1], value); return end
  local ops = {}
  for _, p in ipairs(persons) do
    ops[#ops + 1] = 'SET'; ops[#ops + 1] = 'u1'; ops[#ops + 1] = p; ops[#ops + 1] = value
    if #ops >= 4000 then write(key, 'BITFIELD', key, unpack(ops)); ops = {} end
  end
  if #ops > 0 then write(key, 'BITFIELD', key, unpack(ops)) end
end

local function flush()
  for key, fields in pairs(counts) do
    for field, c in pairs(fields) do
      if c ~= 0 then write(key, 'HINCRBY', key, field, c) end  -- 0: a first time moved within its bucket
    end
  end
  for key, set in pairs(members) do
    local list = {}
    for m, _ in pairs(set) do list[#list + 1] = m end
    each_slice(list, function(...) write(key, 'SADD', key, ...) end)
  end
  for key, set in pairs(bits) do
    local persons = {}
    for p, _ in pairs(set) do persons[#persons + 1] = p end
    set_bits(key, persons)
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
  for key, list in pairs(lists) do each_slice(list, function(...) write(key, 'RPUSH', key, ...) end) end
  for key, list in pairs(appends) do append_kept(key, table.concat(list), list.definitions) end
end

-- The script's answer: how many events were applied, then (hash, reason) of each definition failed.
local function answer(applied)
  local out = {applied}
  for h, reason in pairs(failed) do out[#out + 1] = h; out[#out + 1] = reason end
  return out
end
