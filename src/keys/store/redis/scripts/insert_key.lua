-- ARGV: P, t, max keys (0 = unlimited), key.
local k = read_key(4)
if redis.call('EXISTS', ckey(k.client)) == 0 then return 0 end
local max = tonumber(ARGV[3])
if max > 0 and redis.call('ZCARD', ckeys(k.client)) >= max then return -1 end
local taken = check_new(k)
if taken then return taken end
insert_key(k)
emit('key.created', k.id, 'key', redis.call('HGETALL', kkey(k.id)))
publish(ARGV[2], {k.id}, key_hashes(k))
return 1
