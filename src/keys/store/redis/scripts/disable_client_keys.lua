-- ARGV: P, t, client_id. Disables every key of the client, as an admin (only enabled, disabled_by,
-- the token generation, moved on, and updated_at change).
-- Answers {0} when there is no such client, or {1, {key fields before…}}.
local cid = ARGV[3]
if redis.call('EXISTS', ckey(cid)) == 0 then return {0} end
local ids = redis.call('ZRANGE', ckeys(cid), 0, -1)
local before, hashes = {}, {}
for _, id in ipairs(ids) do
  before[#before + 1] = redis.call('HGETALL', kkey(id))
  append(hashes, hashes_of(id))
end
for _, id in ipairs(ids) do
  local was = redis.call('HGET', kkey(id), 'enabled')
  redis.call('HSET', kkey(id), 'enabled', '0', 'disabled_by', 'admin')
  next_generation(id, ARGV[2])
  touch(id, ARGV[2])
  index_expiry(id)
  if was ~= '0' then
    emit('key.revoked', id, 'key', redis.call('HGETALL', kkey(id)), '{"reason":"disabled"}')
  end
end
publish(ARGV[2], ids, hashes)
return {1, before}
