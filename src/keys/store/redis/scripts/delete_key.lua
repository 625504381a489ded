-- ARGV: P, t, id. Answers the deleted key's fields, or nil.
local id = ARGV[3]
local rec = redis.call('HGETALL', kkey(id))
if #rec == 0 then return nil end
local hashes = hashes_of(id)
remove_key(id, redis.call('HGET', kkey(id), 'client_id'))
emit('key.revoked', id, 'key', rec, '{"reason":"deleted"}')
publish(ARGV[2], {id}, hashes)
return rec
