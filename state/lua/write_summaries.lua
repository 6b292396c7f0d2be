-- Writes persons' summaries of one definition (state/summaries.py, SummaryStore.write).
-- Arguments: A, then A.count persons, each S then S.entries entries named by SE. A person is written
-- only if its kept events still have the length it was summarised from (S.version); `replaced` 1:
-- its kept events become S.replacement (events the summariser could not use were dead-lettered). An
-- empty value removes the person from that day; a day's version moves only when its value changes.
local D = ARGV[A.prefix]
local n = tonumber(ARGV[A.count])
local i, written = S_FIRST, 0
for _ = 1, n do
  local p, version = ARGV[i + S.person], tonumber(ARGV[i + S.version])
  local irregular, replaced, replacement = ARGV[i + S.irregular], ARGV[i + S.replaced], ARGV[i + S.replacement]
  local entries = tonumber(ARGV[i + S.entries])
  i = i + S_WIDTH
  local kept = D .. DK.person_events .. p
  if redis.call('STRLEN', kept) == version then
    if replaced == '1' then
      if replacement == '' then redis.call('DEL', kept) else redis.call('SET', kept, replacement) end
    end
    for _ = 1, entries do
      local kind, day, value = ARGV[i + SE.kind], ARGV[i + SE.day], ARGV[i + SE.value]
      i = i + SE_WIDTH
      local key = D .. DK[kind .. '_rows'] .. day
      local versions = D .. DK[kind .. '_versions']
      if value == '' then
        if redis.call('HDEL', key, p) == 1 then redis.call('HINCRBY', versions, day, 1) end
      elseif redis.call('HGET', key, p) ~= value then
        redis.call('HSET', key, p, value)
        redis.call('HINCRBY', versions, day, 1)
      end
    end
    if irregular == '1' then redis.call('HSET', D .. DK.irregular, p, 1) else redis.call('HDEL', D .. DK.irregular, p) end
    redis.call('SREM', D .. DK.dirty, p)
    written = written + 1
  else
    i = i + SE_WIDTH * entries
  end
end
return written
