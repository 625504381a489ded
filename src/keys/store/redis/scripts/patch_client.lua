-- ARGV: P, t, client_id, has license ('1'/'0'), license, metadata ('keep' / 'set' / 'clear'),
-- metadata. Sets only what is named, on the client as it is now. Every cached principal of the
-- client carries its license: all its keys are invalidated. Answers the client's fields after
-- the write, or nil when there is no such client.
local cid = ARGV[3]
if redis.call('EXISTS', ckey(cid)) == 0 then return nil end
if ARGV[4] == '1' then redis.call('HSET', ckey(cid), 'license', ARGV[5]) end
if ARGV[6] == 'set' then
  redis.call('HSET', ckey(cid), 'metadata', ARGV[7])
elseif ARGV[6] == 'clear' then
  redis.call('HDEL', ckey(cid), 'metadata')
end
local ids = redis.call('ZRANGE', ckeys(cid), 0, -1)
local hashes = {}
for _, id in ipairs(ids) do append(hashes, hashes_of(id)) end
publish(ARGV[2], ids, hashes)
return redis.call('HGETALL', ckey(cid))
