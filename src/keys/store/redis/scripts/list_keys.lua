-- ARGV: P, client_id ('' = all), first rank, last rank.
local idx = ALL_KEYS
if ARGV[2] ~= '' then idx = ckeys(ARGV[2]) end
local out = {redis.call('ZCARD', idx)}
for _, id in ipairs(redis.call('ZRANGE', idx, ARGV[3], ARGV[4])) do
  out[#out + 1] = redis.call('HGETALL', kkey(id))
end
return out
