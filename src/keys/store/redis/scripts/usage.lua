-- ARGV: P, id, from day, to day. Returns day/count pairs in the range.
local out = {}
local all = redis.call('HGETALL', ukey(ARGV[2]))
for i = 1, #all, 2 do
  local day = tonumber(all[i])
  if day >= tonumber(ARGV[3]) and day <= tonumber(ARGV[4]) then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
