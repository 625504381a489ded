-- ARGV: P, t, id, new hash, new prefix, previous valid until ('' = the replaced secret stops at
-- once), rotated at. The hash current at this moment becomes the previous hash (for the grace
-- period) or stops at once; an older previous hash always stops. Only the hashes, prefix,
-- rotated_at, the token generation (moved on) and updated_at change. Answers {1, fields before, fields after}, {0} when there is
-- no such key, {-3} when the new hash is in use.
local id, h, until_ts, at = ARGV[3], ARGV[4], ARGV[6], ARGV[7]
local before = redis.call('HGETALL', kkey(id))
if #before == 0 then return {0} end
if redis.call('EXISTS', hkey(h)) == 1 then return {-3} end
local old = hashes_of(id)
local current = redis.call('HGET', kkey(id), 'key_hash')
for _, o in ipairs(old) do
  local kept = until_ts ~= '' and o == current
  if not kept and redis.call('GET', hkey(o)) == id then redis.call('DEL', hkey(o)) end
end
redis.call('SET', hkey(h), id)
redis.call('HSET', kkey(id), 'key_hash', h, 'prefix', ARGV[5], 'rotated_at', at)
if until_ts ~= '' then
  redis.call('HSET', kkey(id), 'previous_hash', current, 'previous_valid_until', until_ts)
else
  redis.call('HDEL', kkey(id), 'previous_hash', 'previous_valid_until')
end
next_generation(id, at)
touch(id, at)
local after = redis.call('HGETALL', kkey(id))
local pvu = 'null'
if until_ts ~= '' then pvu = until_ts end
emit('key.rotated', id, 'key', after, '{"previous_valid_until":' .. pvu .. '}')
publish(ARGV[2], {id}, append(old, {h}))
return {1, before, after}
