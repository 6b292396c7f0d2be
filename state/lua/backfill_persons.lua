-- A summarised definition's backfill from the archive in one state shard, person by person
-- (state/store.py, StateStore.backfill_persons): the kept events the archived history of topic
-- partition A.fence gives each person (above the shard's fence, below its limit), one append to
-- each person's kept log, the persons in ascending order over several calls. The fence moves to
-- A.through only with the last call (A.last); until then the shard's progress holds the last person
-- written, so a backfill that restarts evaluates the same history again and skips the persons
-- written: each person gets its archived events exactly once. A fence, limit or progress other than the worker read
-- (A.expected, A.limit, A.progress) answers {-4} and writes nothing; a fence behind what this process
-- wrote (A.written_up_to) answers {-2}: Redis lost writes. Arguments: A, then A.count persons E.
local P = ARGV[A.prefix]
-- include: definition_state.lua

local h, part = ARGV[A.definition], ARGV[A.fence]
local D = P .. K.definition .. h .. ':'
local fence = tonumber(redis.call('HGET', D .. DK.backfill_fence, part) or '-1')
if fence < tonumber(ARGV[A.written_up_to]) then return {-2} end
if fence ~= tonumber(ARGV[A.expected]) then return {-4} end
if backfill_limit(D, part) ~= tonumber(ARGV[A.limit]) then return {-4} end
local progress = tonumber(redis.call('HGET', D .. DK.backfill_progress, part) or '-1')
if progress ~= tonumber(ARGV[A.progress]) then return {-4} end
local n = tonumber(ARGV[A.count])
local dirty = {}
for i = 0, n - 1 do
  local b = E_FIRST + i * E_WIDTH
  local p = ARGV[b + E.person]
  if append_kept(P .. K.kept_log .. p, ARGV[b + E.kept], {h}) then dirty[#dirty + 1] = p end
end
if #dirty > 0 then
  local key = D .. DK.dirty
  each_slice(dirty, function(...) write(key, 'SADD', key, ...) end)
end
if ARGV[A.last] == '1' then
  if tonumber(ARGV[A.through]) > fence then redis.call('HSET', D .. DK.backfill_fence, part, ARGV[A.through]) end
  redis.call('HDEL', D .. DK.backfill_progress, part)
elseif n > 0 then
  redis.call('HSET', D .. DK.backfill_progress, part, ARGV[E_FIRST + (n - 1) * E_WIDTH + E.person])
end
flush()
return answer(n)
