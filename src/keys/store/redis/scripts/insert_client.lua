-- ARGV: P, t, client_id, created_at, n, n client field/value strings, first key.
local cid = ARGV[3]
local n = tonumber(ARGV[5])
if redis.call('EXISTS', ckey(cid)) == 1 then return -2 end
local k = read_key(6 + n)
local taken = check_new(k)
if taken then return taken end
local cf = {}
for j = 1, n do cf[j] = ARGV[5 + j] end
redis.call('HSET', ckey(cid), unpack(cf))
redis.call('ZADD', ALL_CLIENTS, ARGV[4], cid)
insert_key(k)
emit('client.created', cid, 'client', redis.call('HGETALL', ckey(cid)))
emit('key.created', k.id, 'key', redis.call('HGETALL', kkey(k.id)))
publish(ARGV[2], {k.id}, key_hashes(k))
return 1
