-- Fixes where a definition's backfill stops on one topic partition (A.fence, `tag:partition`) in one
-- state shard (state/registry.py, DefinitionRegistry.bounds): the offset this shard has applied up
-- to, read in the same call that raises the shard's definitions generation. Batches applied here
-- before the call lie below the bound; every batch after it must carry the definition
-- (apply_shard.lua refuses older plans) and lies at or above it. Batches below the bound that
-- already carried the definition (live saw the registration first) lie at or above the shard's
-- handover; the backfill applies what lies below both. Fixed once: later calls answer the same bound.
local P = ARGV[A.prefix]
if tonumber(redis.call('GET', P .. K.shard_generation) or '0') < tonumber(ARGV[A.generation]) then
  redis.call('SET', P .. K.shard_generation, ARGV[A.generation])
end
local key = P .. K.definition .. ARGV[A.definition] .. ':' .. DK.backfill_bound
redis.call('HSETNX', key, ARGV[A.fence], redis.call('HGET', P .. K.shard_applied, ARGV[A.fence]) or 0)
return tonumber(redis.call('HGET', key, ARGV[A.fence]))
