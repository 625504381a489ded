-- ARGV: P, t, webhook id, new url ('' = unchanged), new events as a JSON list ('' = unchanged).
-- Answers the webhook's JSON after the change, or nil when there is no such webhook.
local w = redis.call('HGET', P .. 'webhooks', ARGV[3])
if not w then return nil end
local v = cjson.decode(w)
if ARGV[4] ~= '' then v.url = ARGV[4] end
if ARGV[5] ~= '' then v.events = cjson.decode(ARGV[5]) end
local out = cjson.encode(v)
redis.call('HSET', P .. 'webhooks', ARGV[3], out)
return out
