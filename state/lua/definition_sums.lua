-- Included by apply_shard.lua and backfill_sums.lua (after definition_state.lua): what counting
-- definitions (trends, property maths, retention) add, summed per key by the worker (the DC, DV, DS,
-- DL and DA sections of a batch), and the events definitions keep, as the worker wrote them out (KD,
-- KP); a write Redis refuses fails that definition only (write).
local DEF_COUNTS = {h = DK.hour_counts, d = DK.day_counts}
local DEF_PERSONS = {h = DK.hour_persons, d = DK.day_persons}
local DEF_VALUES = {h = DK.hour_values, d = DK.day_values}
local DEF_ACTORS = {h = DK.hour_person_events, d = DK.day_person_events}
local function apply_sums(batch)
  for _, c in ipairs(batch.DC) do
    local D = P .. K.definition .. c[DC.definition] .. ':'
    count(D .. DEF_COUNTS[c[DC.kind]] .. c[DC.breakdown], c[DC.bucket], c[DC.events])
    set_bits(D .. DEF_PERSONS[c[DC.kind]] .. c[DC.breakdown] .. ':' .. c[DC.bucket], c[DC.persons])
  end
  for _, v in ipairs(batch.DV) do
    local key = P .. K.definition .. v[DV.definition] .. ':' .. DK.breakdown_values
    for _, bv in ipairs(v[DV.breakdowns]) do member(key, bv) end
  end
  for _, s in ipairs(batch.DS) do
    local key = P .. K.definition .. s[DS.definition] .. ':' .. DK.value_stats .. s[DS.breakdown]
    local sums, field = s[DS.sums], s[DS.field]
    for j = 1, #sums - 1 do write(key, 'HINCRBYFLOAT', key, field .. ':s', sums[j]) end
    local t = values[key]
    if not t then t = {}; values[key] = t end
    t[field] = {sums[#sums], s[DS.count], s[DS.min], s[DS.max]}
  end
  for _, l in ipairs(batch.DL) do
    local key = P .. K.definition .. l[DL.definition] .. ':' .. DEF_VALUES[l[DL.kind]] .. l[DL.breakdown] .. ':' ..
      l[DL.bucket]
    each_slice(l[DL.values], function(...) write(key, 'RPUSH', key, ...) end)
  end
  for _, a in ipairs(batch.DA) do
    local key = P .. K.definition .. a[DA.definition] .. ':' .. DEF_ACTORS[a[DA.kind]] .. a[DA.breakdown] .. ':' ..
      a[DA.bucket]
    local persons = a[DA.persons]
    for j = 1, #persons, 2 do count(key, persons[j], persons[j + 1]) end
  end
end

-- Events kept by funnels (per day) and by summarised definitions (per person, the person marked for
-- the summariser), as the worker wrote them out (dataflows/operators/batch.py and history.py): each
-- KP row's append to the person's kept log, holding the records of the definitions listed
-- (state/records.py, kept_append), is the next `length` bytes of `kept`.
local function apply_kept(batch, kept)
  for _, k in ipairs(batch.KD) do
    local key = P .. K.definition .. k[KD.definition] .. ':' .. DK.day_events .. k[KD.day]
    each_slice(k[KD.rows], function(...) write(key, 'RPUSH', key, ...) end)
  end
  local dirty = {}
  local at = 1
  local prefix = P .. K.kept_log
  for _, k in ipairs(batch.KP) do
    local p, n, definitions = k[KP.person], k[KP.length], k[KP.definitions]
    local records = string.sub(kept, at, at + n - 1)
    at = at + n
    if append_kept(prefix .. p, records, definitions) then
      for _, h in ipairs(definitions) do
        local d = dirty[h]
        if not d then d = {}; dirty[h] = d end
        d[#d + 1] = p
      end
    end
  end
  for h, persons in pairs(dirty) do
    local key = P .. K.definition .. h .. ':' .. DK.dirty
    each_slice(persons, function(...) write(key, 'SADD', key, ...) end)
  end
end
