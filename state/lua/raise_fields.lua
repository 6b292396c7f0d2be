-- Raise stored numbers only (offsets, end offsets): safe to repeat, safe out of order.
-- KEYS[1] the hash; arguments: pairs named by E.
for b = E_FIRST, #ARGV, E_WIDTH do
  local field, value = ARGV[b + E.field], ARGV[b + E.value]
  local cur = redis.call('HGET', KEYS[1], field)
  if not cur or tonumber(value) > tonumber(cur) then redis.call('HSET', KEYS[1], field, value) end
end
return 1
