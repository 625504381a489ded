-- ARGV: P, first rank, last rank.
local out = {redis.call('ZCARD', ALL_CLIENTS)}
for _, id in ipairs(redis.call('ZRANGE', ALL_CLIENTS, ARGV[2], ARGV[3])) do
  out[#out + 1] = redis.call('HGETALL', ckey(id))
end
return out
