-- ARGV: P, key id. Answers {remaining, amount, interval, day, period} or nil.
local v = redis.call('HMGET', crkey(ARGV[2]), 'remaining', 'amount', 'interval', 'day', 'period')
if not v[1] then return nil end
return {v[1], v[2] or '', v[3] or '', v[4] or '', v[5] or '0'}
