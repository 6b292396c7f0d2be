-- Writes the summaries a backfill computed over columns for persons it kept every event of
-- (state/summaries.py, SummaryStore.write_backfilled); answers the persons written.
-- Arguments: A, then A.persons persons S, then A.days days SD, each followed by SD.count pairs (a
-- person, its value; SD.plain: no value is empty). A person is written only if its kept events of
-- definition A.definition are the bytes the backfill gave them (S.version: its records in the kept
-- log A.log followed by the person, and its string written before the kept log): otherwise it stays
-- dirty for the summariser. Written by day, one HSET per day and slice; an empty value removes the
-- person from that day; a written day's version moves.
local D, L, h = ARGV[A.prefix], ARGV[A.log], ARGV[A.definition]
-- include: slices.lua

-- The bytes of definition h's records in a kept log (read as state/records.py reads it: appends of
-- `<definition>,<length>,...;<records>...`); -1 for a damaged log, which no backfill wrote alone.
local function definition_bytes(raw)
  local n, i, size = 0, 1, #raw
  while i <= size do
    local semi = string.find(raw, ';', i, true)
    if not semi or semi == i then return -1 end
    local head = string.sub(raw, i, semi - 1)
    local _, commas = string.gsub(head, ',', '')
    if commas % 2 == 0 then return -1 end  -- an odd number of fields
    local at, fields = semi + 1, 0
    for tag, length in string.gmatch(head .. ',', '([^,]*),([^,]*),') do
      length = tonumber(length)
      if not length then return -1 end
      if tag == h then n = n + length end
      at = at + length
      fields = fields + 2
    end
    if fields == 0 or at > size + 1 then return -1 end
    i = at
  end
  return n
end

local written, done, irregular_now, regular_now = {}, {}, {}, {}
local S_COUNT = tonumber(ARGV[A.persons])
local i = S_FIRST
for _ = 1, tonumber(ARGV[A.persons]) do
  local p = ARGV[i + S.person]
  local bytes = definition_bytes(redis.call('GET', L .. p) or '')
  if bytes >= 0 and bytes + redis.call('STRLEN', D .. DK.person_events .. p) == tonumber(ARGV[i + S.version]) then
    written[p] = true
    done[#done + 1] = p
    if ARGV[i + S.irregular] == '1' then
      irregular_now[#irregular_now + 1] = p; irregular_now[#irregular_now + 1] = 1
    else
      regular_now[#regular_now + 1] = p
    end
  end
  i = i + S_WIDTH
end
for _ = 1, tonumber(ARGV[A.days]) do
  local kind, day, count = ARGV[i + SD.kind], ARGV[i + SD.day], tonumber(ARGV[i + SD.count])
  local first, last = i + SD_WIDTH, i + SD_WIDTH + 2 * count - 1
  local key = D .. DK[kind .. '_rows'] .. day
  local changed = false
  if count > 0 and #done == S_COUNT and ARGV[i + SD.plain] == '1' then
    -- Every person is written and no value is empty: the pairs go to HSET as they are.
    for a = first, last, 4000 do redis.call('HSET', key, unpack(ARGV, a, math.min(a + 3999, last))) end
    changed = true
  elseif count > 0 then
    local set, removed = {}, {}
    for j = first, last, 2 do
      local p = ARGV[j]
      if written[p] then
        if ARGV[j + 1] == '' then removed[#removed + 1] = p else set[#set + 1] = p; set[#set + 1] = ARGV[j + 1] end
      end
    end
    if #set > 0 then sliced('HSET', key, set) end
    if #removed > 0 then sliced('HDEL', key, removed) end
    changed = #set > 0 or #removed > 0
  end
  if changed then redis.call('HINCRBY', D .. DK[kind .. '_versions'], day, 1) end
  i = last + 1
end
if #irregular_now > 0 then sliced('HSET', D .. DK.irregular, irregular_now) end
if #regular_now > 0 then sliced('HDEL', D .. DK.irregular, regular_now) end
if #done > 0 then sliced('SREM', D .. DK.dirty, done) end
return done
