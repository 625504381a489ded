-- ARGV: P, webhook id, the webhook as JSON, the most webhooks there may be. Answers 1 written,
-- 0 the id is taken, 2 there are that many webhooks already (nothing written).
local key = P .. 'webhooks'
if redis.call('HLEN', key) >= tonumber(ARGV[4]) then return 2 end
return redis.call('HSETNX', key, ARGV[2], ARGV[3])
