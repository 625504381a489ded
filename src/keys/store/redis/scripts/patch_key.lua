-- ARGV: P, t, id, updated_at, n, n strings of field/value pairs to set, then the names of the
-- fields to remove (attributes set to none). Sets only those fields, on the key as it is now,
-- and raises updated_at; the hashes and every field not named stay as they are. Answers the
-- key's fields after the write, or nil when there is no such key.
local PATCHABLE = {name = true, enabled = true, permissions = true, expires_at = true,
                   rate_limit = true, metadata = true}
local id = ARGV[3]
if redis.call('EXISTS', kkey(id)) == 0 then return nil end
local n = tonumber(ARGV[5])
local set, clear = {}, {}
for j = 1, n do set[j] = ARGV[5 + j] end
for j = 6 + n, #ARGV do clear[#clear + 1] = ARGV[j] end
for j = 1, n, 2 do
  if not PATCHABLE[set[j]] then return redis.error_reply('not a patchable field') end
end
for _, f in ipairs(clear) do
  if not PATCHABLE[f] then return redis.error_reply('not a patchable field') end
end
if n > 0 then redis.call('HSET', kkey(id), unpack(set)) end
if #clear > 0 then redis.call('HDEL', kkey(id), unpack(clear)) end
touch(id, ARGV[4])
publish(ARGV[2], {id}, hashes_of(id))
return redis.call('HGETALL', kkey(id))
