-- ARGV: P, mode ('always' | 'if_none'), kid, record, then the kids to remove.
-- Adds the signing key (unless mode is 'if_none' and a key exists), removes the others named,
-- and answers every record as the write left them.
local P = ARGV[1]
local set = P .. 'signing_keys'
if ARGV[2] == 'always' or redis.call('HLEN', set) == 0 then
  redis.call('HSET', set, ARGV[3], ARGV[4])
  for i = 5, #ARGV do redis.call('HDEL', set, ARGV[i]) end
end
return redis.call('HVALS', set)
