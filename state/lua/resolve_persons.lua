-- Resolves the persons of a batch's events that need Redis (state/store.py, StateStore.resolve_persons):
-- distinct ids the caller does not know yet and identity links, in event order (person properties
-- are applied with the batch, apply_batch.lua). An event already applied (the worker found its uuid
-- guard: `applied` is '1') changes nothing. Arguments: A, then A.count
-- items named by E. Answer: the number of (distinct id, person) pairs, the pairs (every distinct id
-- the items name, as the call leaves them), then (merged person, person it became) pairs.
local P = ARGV[A.prefix]
-- include: persons.lua

local n = tonumber(ARGV[A.count])
local named = {}
for i = 0, n - 1 do
  local b = E_FIRST + i * E_WIDTH
  local did, kind, other = ARGV[b + E.distinct_id], ARGV[b + E.link_kind], ARGV[b + E.link_other]
  named[did] = true
  if kind ~= '' then named[other] = true end
  if ARGV[b + E.applied] == '' then resolve(did, kind, other) end
end
local out = {0}
for did, _ in pairs(named) do
  local p = redis.call('HGET', P .. K.distinct_ids, did)
  if p then out[#out + 1] = did; out[#out + 1] = p; out[1] = out[1] + 1 end
end
for _, v in ipairs(merges) do out[#out + 1] = v end
return out
