-- ARGV: P, t, client_id, new key. Deletes every key of the client and inserts the new one.
-- Answers {status} (0: no such client, -3: the new key's id or hash is in use) or
-- {1, {key fields before…}}.
local cid = ARGV[3]
if redis.call('EXISTS', ckey(cid)) == 0 then return {0} end
local k = read_key(4)
local taken = check_new(k)
if taken then return {taken} end
local ids = redis.call('ZRANGE', ckeys(cid), 0, -1)
local before, hashes = {}, {}
for _, id in ipairs(ids) do
  before[#before + 1] = redis.call('HGETALL', kkey(id))
  append(hashes, hashes_of(id))
end
for i, id in ipairs(ids) do
  remove_key(id, cid)
  emit('key.revoked', id, 'key', before[i], '{"reason":"deleted"}')
end
insert_key(k)
emit('key.created', k.id, 'key', redis.call('HGETALL', kkey(k.id)))
ids[#ids + 1] = k.id
append(hashes, key_hashes(k))
publish(ARGV[2], ids, hashes)
return {1, before}
