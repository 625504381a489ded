-- ARGV: P, t, client_id, license, has metadata ('1'/'0'), metadata.
-- Every cached principal of the client carries its license: all its keys are invalidated.
local cid = ARGV[3]
if redis.call('EXISTS', ckey(cid)) == 0 then return 0 end
redis.call('HSET', ckey(cid), 'license', ARGV[4])
if ARGV[5] == '1' then
  redis.call('HSET', ckey(cid), 'metadata', ARGV[6])
else
  redis.call('HDEL', ckey(cid), 'metadata')
end
local ids = redis.call('ZRANGE', ckeys(cid), 0, -1)
local hashes = {}
for _, id in ipairs(ids) do append(hashes, hashes_of(id)) end
publish(ARGV[2], ids, hashes)
return 1
