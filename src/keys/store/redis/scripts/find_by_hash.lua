-- ARGV: P, hash hex, now. The key whose current hash, or previous hash within its grace
-- period, is the given one, with its client's license.
local h = ARGV[2]
local id = redis.call('GET', hkey(h))
if not id then return nil end
local v = redis.call('HMGET', kkey(id), 'key_hash', 'previous_hash', 'previous_valid_until')
if v[1] ~= h then
  if v[2] ~= h or not v[3] or tonumber(v[3]) <= tonumber(ARGV[3]) then return nil end
end
return record(id)
