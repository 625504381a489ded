-- ARGV: P, t, webhook id. Deletes the webhook, its pending deliveries and its attempts (an
-- attempt under way then records nothing: its delivery is gone). Answers its JSON, or nil when
-- there is no such webhook.
local id = ARGV[3]
local w = redis.call('HGET', P .. 'webhooks', id)
if not w then return nil end
redis.call('HDEL', P .. 'webhooks', id)
local wq = P .. 'wq:' .. id
for _, q in ipairs(redis.call('SMEMBERS', wq)) do
  local ds = redis.call('LRANGE', P .. 'q:' .. q, 0, -1)
  for _, d in ipairs(ds) do redis.call('DEL', P .. 'd:' .. d) end
  redis.call('DECRBY', P .. 'events:pending', #ds)
  redis.call('DEL', P .. 'q:' .. q)
  redis.call('ZREM', P .. 'events:due', q)
end
redis.call('DEL', wq, P .. 'attempts:' .. id)
return w
