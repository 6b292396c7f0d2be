-- A definition's backfill over one partition's history in one state shard (state/store.py,
-- StateStore.backfill): applies the events of this shard's persons that lie above its backfill fence,
-- below its bound (fix_bound.lua) and below its live handover (the first offset this shard applied
-- the definition live): what live applied without the definition. It advances the
-- fence to the last offset the worker read (A.through) in the same call, so a restarted backfill
-- never applies twice. The worker passes only events whose guard holds this copy (the copy live
-- counted), with the person live counted them for. Arguments: A, then A.count rows named by E, then T.
local P = ARGV[A.prefix]
-- include: definition_state.lua

local h, flags, part = ARGV[A.definition], ARGV[A.flags], ARGV[A.fence]
local n = tonumber(ARGV[A.count])
local D = P .. K.definition .. h .. ':'
local fence = tonumber(redis.call('HGET', D .. DK.backfill_fence, part) or '-1')
-- The fence is behind what this process already wrote: Redis lost its last writes (a crash between
-- AOF syncs). Applying on from here would leave a gap, so the caller restarts from the fence.
if fence < tonumber(ARGV[E_FIRST + n * E_WIDTH + T.written_up_to]) then return {-2} end
local bound = backfill_limit(D, part)
local applied = 0
for i = 0, n - 1 do
  local b = E_FIRST + i * E_WIDTH
  local off = tonumber(ARGV[b + E.offset])
  if off > fence and off < bound then
    local c = cjson.decode(ARGV[b + E.contribution])
    apply_definition(h, flags, c[1], c[2], ARGV[b + E.person], ARGV[b + E.hour], ARGV[b + E.day], ARGV[b + E.ts],
      ARGV[b + E.uuid])
    applied = applied + 1
  end
end
flush()
local through = tonumber(ARGV[A.through])
if through > fence then redis.call('HSET', D .. DK.backfill_fence, part, through) end
return answer(applied)
