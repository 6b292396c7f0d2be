-- A recreated topic: forget its offsets and counted records, keep the dead-letter count, note when it
-- was noticed and which topic it replaced (/readyz reports it), and take the new topic's end offsets
-- (A.ends, JSON partition -> end, read before the call) in the same write, so lag never reads 0
-- between forgetting the old topic's ends and learning the new one's.
-- KEYS: the topic's stream hash (KEYS[1]) and its dead-letter ids (KEYS[2]).
local current = redis.call('HGET', KEYS[1], 'topic_id')
if current == ARGV[A.topic_id] then return 0 end
-- No topic recorded yet: end offsets already there were acknowledged to capture on this topic
-- (capture can run before the dataflow first starts); keep them, or lag would read 0 too early.
if not current then
  redis.call('HSET', KEYS[1], 'topic_id', ARGV[A.topic_id])
  return 0
end
local dlq = redis.call('HGET', KEYS[1], 'dlq_events')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'topic_id', ARGV[A.topic_id], 'previous_topic_id', current, 'recreated_at_ms', ARGV[A.now_ms])
if dlq then redis.call('HSET', KEYS[1], 'dlq_events', dlq) end
for partition, end_offset in pairs(cjson.decode(ARGV[A.ends])) do
  if end_offset > 0 then redis.call('HSET', KEYS[1], 'end:' .. partition, end_offset) end
end
return 1
