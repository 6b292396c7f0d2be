-- Writes the summaries a backfill computed over columns for persons it kept every event of
-- (state/summaries.py, SummaryStore.write_backfilled); answers the persons written.
-- Arguments: A, then A.persons persons S, then A.days days SD: a day's persons and the lengths of
-- their values (comma-separated), and the values back to back. A person is written only if its kept
-- events still have the length the backfill gave them (S.version): otherwise it stays dirty for the
-- summariser. Written by day, one HSET per day and slice; an empty value removes the person from
-- that day; a written day's version moves.
local D = ARGV[A.prefix]
-- include: slices.lua
local written, done, irregular_now, regular_now = {}, {}, {}, {}
local i = S_FIRST
for _ = 1, tonumber(ARGV[A.persons]) do
  local p = ARGV[i + S.person]
  if redis.call('STRLEN', D .. DK.person_events .. p) == tonumber(ARGV[i + S.version]) then
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
  local kind, day, values = ARGV[i + SD.kind], ARGV[i + SD.day], ARGV[i + SD.values]
  local lengths, set, removed, at = string.gmatch(ARGV[i + SD.lengths], '%d+'), {}, {}, 1
  for p in string.gmatch(ARGV[i + SD.persons], '%d+') do
    local size = tonumber(lengths())
    if written[p] then
      if size == 0 then
        removed[#removed + 1] = p
      else
        set[#set + 1] = p; set[#set + 1] = string.sub(values, at, at + size - 1)
      end
    end
    at = at + size
  end
  i = i + SD_WIDTH
  if #set > 0 or #removed > 0 then
    local key = D .. DK[kind .. '_rows'] .. day
    if #set > 0 then sliced('HSET', key, set) end
    if #removed > 0 then sliced('HDEL', key, removed) end
    redis.call('HINCRBY', D .. DK[kind .. '_versions'], day, 1)
  end
end
if #irregular_now > 0 then sliced('HSET', D .. DK.irregular, irregular_now) end
if #regular_now > 0 then sliced('HDEL', D .. DK.irregular, regular_now) end
if #done > 0 then sliced('SREM', D .. DK.dirty, done) end
return done
