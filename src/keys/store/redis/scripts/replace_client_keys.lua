-- ARGV: P, t, client_id, disable only ('1'/'0'), has new key ('1'/'0'), new key.
-- Answers {status} or {1, {key fields before…}}.
local cid = ARGV[3]
if redis.call('EXISTS', ckey(cid)) == 0 then return {0} end
local k = nil
if ARGV[5] == '1' then
  k = read_key(6)
  local taken = check_new(k)
  if taken then return {taken} end
end
local ids = redis.call('ZRANGE', ckeys(cid), 0, -1)
local before, hashes = {}, {}
for _, id in ipairs(ids) do
  before[#before + 1] = redis.call('HGETALL', kkey(id))
  append(hashes, hashes_of(id))
end
for _, id in ipairs(ids) do
  if ARGV[4] == '1' then
    redis.call('HSET', kkey(id), 'enabled', '0', 'updated_at', ARGV[2])
  else
    remove_key(id, cid)
  end
end
if k then
  insert_key(k)
  ids[#ids + 1] = k.id
  append(hashes, key_hashes(k))
end
publish(ARGV[2], ids, hashes)
return {1, before}
