-- ARGV: P, t, key. Replaces every field but id, client_id and created_at.
local k = read_key(3)
local old = redis.call('HMGET', kkey(k.id), 'client_id', 'created_at', 'last_used_at')
if not old[1] then return 0 end
for _, h in ipairs(key_hashes(k)) do
  local owner = redis.call('GET', hkey(h))
  if owner and owner ~= k.id then return -3 end
end
local old_hashes = hashes_of(k.id)
for _, h in ipairs(old_hashes) do
  if h ~= k.h and h ~= k.ph then redis.call('DEL', hkey(h)) end
end
redis.call('DEL', kkey(k.id))
redis.call('HSET', kkey(k.id), 'id', k.id, 'client_id', old[1], 'created_at', old[2],
           unpack(k.fields))
-- last_used_at only moves forward: a usage flush between the caller's read and this write
-- is kept.
if old[3] then
  local cur = redis.call('HGET', kkey(k.id), 'last_used_at')
  if not cur or tonumber(cur) < tonumber(old[3]) then
    redis.call('HSET', kkey(k.id), 'last_used_at', old[3])
  end
end
for _, h in ipairs(key_hashes(k)) do redis.call('SET', hkey(h), k.id) end
publish(ARGV[2], {k.id}, append(old_hashes, key_hashes(k)))
return 1
