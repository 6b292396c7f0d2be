-- Included by scripts that send long lists to a command.
-- Long lists go to a command in slices of 1,000 items (an even number), which Lua's unpack can take.
local function each_slice(list, fn)
  for i = 1, #list, 1000 do fn(unpack(list, i, math.min(i + 999, #list))) end
end

-- The replies of a command over a long list, sent in slices; slices hold an even number of items, so
-- field/value pairs stay together.
local function sliced(command, key, list)
  local replies = {}
  each_slice(list, function(...)
    local r = redis.call(command, key, ...)
    if type(r) == 'table' then for _, v in ipairs(r) do replies[#replies + 1] = v end end
  end)
  return replies
end
