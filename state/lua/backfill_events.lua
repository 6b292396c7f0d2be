-- A definition's backfill over one partition's history (state/store.py, StateStore.backfill): applies
-- only the copy of each event the live state counted (its guard holds this partition:offset), only
-- below the live handover offset, and advances the backfill fence in the same call, so a restarted
-- backfill never applies twice. Arguments: A, then A.count rows named by E, then T.
local P = ARGV[A.prefix]
-- include: definition_state.lua

local h, flags, part = ARGV[A.definition], ARGV[A.flags], ARGV[A.partition]
local n = tonumber(ARGV[A.count])
local D = P .. K.definition .. h .. ':'
local fence = tonumber(redis.call('HGET', D .. DK.backfill_fence, part) or '-1')
-- The fence is behind what this process already wrote: Redis lost its last writes (a crash between
-- AOF syncs). Applying on from here would leave a gap, so the caller restarts from the fence.
if fence < tonumber(ARGV[E_FIRST + n * E_WIDTH + T.written_up_to]) then return {-2} end
local ho = redis.call('HGET', D .. DK.handover, part)
ho = ho and tonumber(ho) or nil
local applied, last = 0, fence
for i = 0, n - 1 do
  local b = E_FIRST + i * E_WIDTH
  local off = tonumber(ARGV[b + E.offset])
  if off > fence and (not ho or off < ho) then
    local contribution = ARGV[b + E.contribution]
    if contribution ~= '' and
        redis.call('HGET', P .. K.seen .. ARGV[b + E.bucket], ARGV[b + E.uuid]) == part .. ':' .. ARGV[b + E.offset] then
      local p = redis.call('HGET', P .. K.distinct_ids, ARGV[b + E.distinct_id])
      if p then
        local c = cjson.decode(contribution)
        apply_definition(h, flags, c[1], c[2], p, ARGV[b + E.hour], ARGV[b + E.day], ARGV[b + E.ts], ARGV[b + E.uuid])
        applied = applied + 1
      end
    end
  end
  if off > last then last = off end
end
flush()
if last > fence then redis.call('HSET', D .. DK.backfill_fence, part, last) end
return answer(applied)
