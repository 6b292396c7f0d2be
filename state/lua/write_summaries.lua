-- Writes persons' summaries of one definition (state/summaries.py, SummaryStore.write); answers the
-- persons written.
-- Arguments: A, then A.count persons, each S then S.entries entries named by SE. A person is written
-- only if its kept events still have the length it was summarised from (S.version: its kept log's,
-- A.log followed by the person, and its string written before the kept log); `replaced` 1: its kept
-- log becomes S.replacement, and the older string goes (events the summariser could not use were
-- dead-lettered; state/records.py, rewritten_log). An empty value removes the person from that day;
-- a day's version moves only when its value changes.
local D, L = ARGV[A.prefix], ARGV[A.log]
-- include: slices.lua
local n = tonumber(ARGV[A.count])
local i = S_FIRST
-- Gathered over the call and written once each at its end: days whose value changed (their version
-- moves once), persons summarised (no longer dirty), persons irregular or not.
local changed, done, irregular_now, regular_now = {}, {}, {}, {}
for _ = 1, n do
  local p, version = ARGV[i + S.person], tonumber(ARGV[i + S.version])
  local irregular, replaced, replacement = ARGV[i + S.irregular], ARGV[i + S.replaced], ARGV[i + S.replacement]
  local entries = tonumber(ARGV[i + S.entries])
  i = i + S_WIDTH
  local kept, older = L .. p, D .. DK.person_events .. p
  if redis.call('STRLEN', kept) + redis.call('STRLEN', older) == version then
    if replaced == '1' then
      redis.call('SET', kept, replacement)
      redis.call('DEL', older)
    end
    for _ = 1, entries do
      local kind, day, value = ARGV[i + SE.kind], ARGV[i + SE.day], ARGV[i + SE.value]
      i = i + SE_WIDTH
      local key = D .. DK[kind .. '_rows'] .. day
      local moved
      if value == '' then
        moved = redis.call('HDEL', key, p) == 1
      elseif redis.call('HGET', key, p) ~= value then
        redis.call('HSET', key, p, value)
        moved = true
      end
      if moved then
        local days = changed[kind]
        if not days then days = {}; changed[kind] = days end
        days[day] = true
      end
    end
    if irregular == '1' then
      irregular_now[#irregular_now + 1] = p; irregular_now[#irregular_now + 1] = 1
    else
      regular_now[#regular_now + 1] = p
    end
    done[#done + 1] = p
  else
    i = i + SE_WIDTH * entries
  end
end
for kind, days in pairs(changed) do
  for day, _ in pairs(days) do redis.call('HINCRBY', D .. DK[kind .. '_versions'], day, 1) end
end
if #irregular_now > 0 then sliced('HSET', D .. DK.irregular, irregular_now) end
if #regular_now > 0 then sliced('HDEL', D .. DK.irregular, regular_now) end
if #done > 0 then sliced('SREM', D .. DK.dirty, done) end
return done
