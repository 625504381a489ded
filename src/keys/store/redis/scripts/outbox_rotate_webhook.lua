-- ARGV: P, t, webhook id, new secret, until when the secret it replaces signs too (ms; ''
-- = it stops at once). Answers the webhook's JSON after the change, or nil when there is no
-- such webhook.
local w = redis.call('HGET', P .. 'webhooks', ARGV[3])
if not w then return nil end
local v = cjson.decode(w)
if ARGV[5] ~= '' then
  v.previous_secret = v.secret
  v.previous_until = tonumber(ARGV[5])
else
  v.previous_secret = nil
  v.previous_until = nil
end
v.secret = ARGV[4]
local out = cjson.encode(v)
redis.call('HSET', P .. 'webhooks', ARGV[3], out)
return out
