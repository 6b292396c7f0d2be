-- Applies one state shard's part of a project's batch (state/store.py, StateStore.apply), after the
-- home part (apply_batch.lua) took the events' guards: what they add, summed per key by the worker, to
-- the counts, person sets and first times of the persons kept in this shard, and their contributions
-- to registered definitions. Refused, writing nothing:
--   {-1}  when the batch was planned with definitions older than this shard's generation (raised
--         when a backfill fixes its bound here, fix_bound.lua): the worker reloads and plans again;
--   {-3, partition, next offset, ...}  when this shard holds some of the events already (a replay
--         after a crash): the worker plans again without the events below those offsets.
-- Otherwise it applies everything and raises its per-partition fence in the same call. Arguments:
-- the header A; A.batch is a JSON object of sections, each a list of rows named by its layout (person
-- ids, buckets and counts that go into keys or commands arrive as text: state/store.py, home_args):
--   R  ranges:          fence (`topic tag:partition`), first offset, next offset (of this shard's events)
--   C  counts:          kind ('h' hour, 'd' day), event, bucket, events
--   B  person sets:     kind, event, bucket, persons (a list of person ids)
--   F  first times:     event, candidates (a list of FP rows: person, ts, hour, day)
--   H  handovers:       definition, fence (`topic tag:partition`), first offset applied live here (backfill_events.lua)
--   KD kept per day:    definition, day, rows (funnel events, `person|ts|uuid|value`)
--   KP kept per person: definition, person, length (of its records `ts,day,uuid,len:value` to append,
--                       the next bytes of A.kept, which holds every row's records back to back)
--   DC definition sums:  definition, kind ('h'/'d'), breakdown, bucket, events, persons (a list)
--   DV breakdowns seen:  definition, breakdowns (a list)
--   DS property values:  definition, breakdown, field (h<hour>/d<day>), sums (partial sums: each fits a
--                        double; Redis adds them in long double), count, min, max
--   DL values kept:      definition, kind, breakdown, bucket, values (quantile maths)
--   DA events per person: definition, kind, breakdown, bucket, persons (person, events, person, ...)
local P = ARGV[A.prefix]
-- include: definition_state.lua
-- include: definition_sums.lua

if tonumber(redis.call('GET', P .. K.shard_generation) or '0') > tonumber(ARGV[A.generation]) then return {-1} end
local batch = cjson.decode(ARGV[A.batch])

local held = {}
for _, r in ipairs(batch.R) do
  local fence = redis.call('HGET', P .. K.shard_applied, r[R.fence])
  if fence and tonumber(fence) > r[R.first] then
    held[#held + 1] = r[R.fence]; held[#held + 1] = tonumber(fence)
  end
end
if #held > 0 then
  table.insert(held, 1, -3)
  return held
end

local COUNTS = {h = K.hour_counts, d = K.day_counts}
for _, c in ipairs(batch.C) do
  redis.call('HINCRBY', P .. COUNTS[c[C.kind]] .. c[C.event], c[C.bucket], c[C.events])
end

-- Person sets: a bit per person id, the persons of one key in as few BITFIELDs as Lua allows.
local PERSONS = {h = K.hour_persons, d = K.day_persons}
for _, b in ipairs(batch.B) do
  set_bits(P .. PERSONS[b[B.kind]] .. b[B.event] .. ':' .. b[B.bucket], b[B.persons])
end

-- First time per person and event, stored as 'ts:hour:day' so a later batch holding an earlier
-- event can move the person's first-time count from the old buckets to the new ones. Counts and
-- new bits are gathered per key and written by flush() (definition_state.lua); the bits a move
-- clears go first, one BITFIELD per key, so a person moved to an earlier time in the same bucket
-- keeps its bit.
local cleared = {}
for _, f in ipairs(batch.F) do
  local ev, candidates = f[F.event], f[F.candidates]
  local fkey = P .. K.first_seen .. ev
  local fields = {}
  for j, c in ipairs(candidates) do fields[j] = c[FP.person] end
  local current = sliced('HMGET', fkey, fields)
  local updates = {}
  for j, c in ipairs(candidates) do
    local p, ts, hour, day = c[FP.person], c[FP.ts], c[FP.hour], c[FP.day]
    local cur = current[j]
    local old_ts, old_hour, old_day
    if cur then
      old_ts, old_hour, old_day = string.match(cur, '^(-?%d+):(-?%d+):(%d+)$')
      old_ts = tonumber(old_ts)
    end
    if not cur or ts < old_ts then
      if cur then
        count(P .. K.first_time_hour_counts .. ev, old_hour, -1)
        count(P .. K.first_time_day_counts .. ev, old_day, -1)
        for _, key in ipairs({P .. K.first_time_hour_persons .. ev .. ':' .. old_hour,
                              P .. K.first_time_day_persons .. ev .. ':' .. old_day}) do
          local t = cleared[key]
          if not t then t = {}; cleared[key] = t end
          t[#t + 1] = p
        end
      end
      count(P .. K.first_time_hour_counts .. ev, hour, 1)
      count(P .. K.first_time_day_counts .. ev, day, 1)
      mark(P .. K.first_time_hour_persons .. ev .. ':' .. hour, p)
      mark(P .. K.first_time_day_persons .. ev .. ':' .. day, p)
      updates[#updates + 1] = p; updates[#updates + 1] = ts .. ':' .. hour .. ':' .. day
    end
  end
  if #updates > 0 then sliced('HSET', fkey, updates) end
end
for key, persons in pairs(cleared) do set_bits(key, persons, '0') end

for _, o in ipairs(batch.H) do
  redis.call('HSETNX', P .. K.definition .. o[H.definition] .. ':' .. DK.handover, o[H.fence], o[H.offset])
end
apply_kept(batch, ARGV[A.kept])
apply_sums(batch)
flush()
for _, r in ipairs(batch.R) do redis.call('HSET', P .. K.shard_applied, r[R.fence], r[R.next_offset]) end
return answer(0)
