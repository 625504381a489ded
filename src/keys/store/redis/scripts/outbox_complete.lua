-- ARGV: P, now, delivery id, outcome ('delivered', 'retry' or 'failed'), next attempt (ms, for
-- 'retry'), the attempt as JSON. Records the attempt (the webhook's 1,000 latest are kept);
-- when the delivery is still the head of its queue (its lease was not lost to another caller
-- that made it since), moves on: 'retry' schedules it again, the others drop it and make the
-- next of its queue due. Answers 1, or 0 when nothing but the attempt was recorded.
local d, outcome, nxt = ARGV[3], ARGV[4], ARGV[5]
local DUE = P .. 'events:due'
local dk = P .. 'd:' .. d
local h = redis.call('HMGET', dk, 'webhook', 'queue')
if not h[1] then return 0 end
local attempts = P .. 'attempts:' .. h[1]
redis.call('LPUSH', attempts, ARGV[6])
redis.call('LTRIM', attempts, 0, 999)
local qk = P .. 'q:' .. h[2]
if redis.call('LINDEX', qk, 0) ~= d then return 0 end
if outcome == 'retry' then
  redis.call('HINCRBY', dk, 'attempts', 1)
  redis.call('ZADD', DUE, nxt, h[2])
  return 1
end
redis.call('LPOP', qk)
redis.call('DEL', dk)
redis.call('DECR', P .. 'events:pending')
local nd = redis.call('LINDEX', qk, 0)
if nd then
  redis.call('ZADD', DUE, redis.call('HGET', P .. 'd:' .. nd, 't'), h[2])
else
  redis.call('ZREM', DUE, h[2])
  redis.call('SREM', P .. 'wq:' .. h[1], h[2])
end
return 1
