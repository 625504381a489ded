-- ARGV: P, t, key id, op ('set' | 'set_remaining' | 'add' | 'remove'), n, refill amount
-- ('' = none), interval, day, period of the new refill, calendar day, month, day of month,
-- max credits. Answers {0} no such key, {1} too many, {2, remaining, amount, interval, day,
-- period} or {3} (no credits now). A change of terms publishes an invalidation of the key.
local id, op = ARGV[3], ARGV[4]
if redis.call('EXISTS', kkey(id)) == 0 then return {0} end
local n = tonumber(ARGV[5])
local had = redis.call('EXISTS', crkey(id)) == 1
local cur = current_credits(id, ARGV[10], ARGV[11], ARGV[12])
local max = tonumber(ARGV[13])
local function answer()
  local v = redis.call('HMGET', crkey(id), 'remaining', 'amount', 'interval', 'day', 'period')
  return {2, v[1], v[2] or '', v[3] or '', v[4] or '', v[5] or '0'}
end
if op == 'remove' then
  redis.call('DEL', crkey(id))
  if had then publish(ARGV[2], {id}, hashes_of(id)) end
  return {3}
end
local remaining
if op == 'add' then remaining = (cur or 0) + n else remaining = n end
if remaining > max then return {1} end
if op == 'set' then
  redis.call('DEL', crkey(id))
  redis.call('HSET', crkey(id), 'remaining', num(remaining), 'period', ARGV[9])
  if ARGV[6] ~= '' then
    redis.call('HSET', crkey(id), 'amount', ARGV[6], 'interval', ARGV[7])
    if ARGV[8] ~= '' then redis.call('HSET', crkey(id), 'day', ARGV[8]) end
  end
  publish(ARGV[2], {id}, hashes_of(id))
else
  if not had then redis.call('HSET', crkey(id), 'period', '0') end
  redis.call('HSET', crkey(id), 'remaining', num(remaining))
  if not had then publish(ARGV[2], {id}, hashes_of(id)) end
end
-- quota.threshold: credits without refill start a fresh amount at each set/add ('set' cleared
-- the state with the hash).
if not redis.call('HGET', crkey(id), 'amount') then
  redis.call('HSET', crkey(id), 'base', num(remaining), 'alerted', '0')
end
return answer()
