-- Count dead-lettered records once, however often they are replayed.
-- KEYS: the topic's dead-letter ids (KEYS[1]) and its stream hash (KEYS[2]); arguments: record ids.
local added = 0
for b = E_FIRST, #ARGV, E_WIDTH do added = added + redis.call('HSETNX', KEYS[1], ARGV[b + E.record], 1) end
if added > 0 then redis.call('HINCRBY', KEYS[2], 'dlq_events', added) end
return added
