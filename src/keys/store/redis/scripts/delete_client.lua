-- ARGV: P, t, client_id. Answers {client fields, {key fields…}} or nil.
local cid = ARGV[3]
local c = redis.call('HGETALL', ckey(cid))
if #c == 0 then return nil end
local ids = redis.call('ZRANGE', ckeys(cid), 0, -1)
local keys, hashes = {}, {}
for _, id in ipairs(ids) do
  keys[#keys + 1] = redis.call('HGETALL', kkey(id))
  append(hashes, hashes_of(id))
  remove_key(id, cid)
  emit('key.revoked', id, 'key', keys[#keys], '{"reason":"deleted"}')
end
emit('client.deleted', cid, 'client', c, '{"keys_deleted":' .. #ids .. '}')
redis.call('DEL', ckey(cid), ckeys(cid))
redis.call('ZREM', ALL_CLIENTS, cid)
publish(ARGV[2], ids, hashes)
return {c, keys}
