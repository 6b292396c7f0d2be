-- A definition's backfill from the archive in one state shard, summed by the worker
-- (dataflows/operators/history.py, state/store.py StateStore.backfill_sums): what the archived events
-- of topic partition A.fence between the shard's backfill fence and its bound (and live handover) add,
-- as the DC/DV/DS/DL/DA sections of apply_shard.lua for a counting definition, its KD/KP sections for
-- one that keeps events, with the fence moved to A.through in the same
-- call. The worker read the fence and limit (A.expected, A.limit) and summed only the events between
-- them; a fence or limit that moved since answers {-4} and writes nothing (the worker reads them
-- again), a fence behind what this
-- process wrote (A.written_up_to) answers {-2}: Redis lost writes. Arguments: the header A; A.batch
-- is a JSON object of those sections, and of DB rows naming the later arguments that hold bitmaps;
-- A.kept the KP rows' records.
local P = ARGV[A.prefix]
-- include: definition_state.lua
-- include: definition_sums.lua

local D = P .. K.definition .. ARGV[A.definition] .. ':'
local part = ARGV[A.fence]
local fence = tonumber(redis.call('HGET', D .. DK.backfill_fence, part) or '-1')
if fence < tonumber(ARGV[A.written_up_to]) then return {-2} end
if fence ~= tonumber(ARGV[A.expected]) then return {-4} end
if backfill_limit(D, part) ~= tonumber(ARGV[A.limit]) then return {-4} end
local batch = cjson.decode(ARGV[A.batch])
apply_sums(batch)
apply_kept(batch, ARGV[A.kept])
flush()
-- Dense person sets come whole, as bitmaps: one OR each instead of a BITFIELD operation per person.
local scratch = P .. K.scratch
for _, b in ipairs(batch.DB or {}) do
  local key = P .. K.definition .. b[DB.definition] .. ':' .. DEF_PERSONS[b[DB.kind]] .. b[DB.breakdown] .. ':' ..
    b[DB.bucket]
  redis.call('SET', scratch, ARGV[b[DB.argument]])
  write(key, 'BITOP', 'OR', key, key, scratch)
end
if batch.DB and #batch.DB > 0 then redis.call('DEL', scratch) end
local through = tonumber(ARGV[A.through])
if through > fence then redis.call('HSET', D .. DK.backfill_fence, part, through) end
return answer(0)
