-- ARGV: P, key id, cost ('' = the key is not charged credits), calendar day, month, day of
-- month, quota key suffix ('' = no quota), quota limit, quota ttl seconds.
-- Charges credits and quota together or not at all. Answers {status, credits|-1, quota|-1}:
-- status 0 charged, 1 credits short, 2 quota used up (-1: none).
local id = ARGV[2]
local credits = nil
if ARGV[3] ~= '' then credits = current_credits(id, ARGV[4], ARGV[5], ARGV[6]) end
local cost = tonumber(ARGV[3] ~= '' and ARGV[3] or '0')
local qk, used, limit = nil, 0, 0
if ARGV[7] ~= '' then
  qk = P .. 'quota:' .. ARGV[7]
  used = tonumber(redis.call('GET', qk) or '0')
  limit = tonumber(ARGV[8])
end
local function left(u) if qk then return math.max(limit - u, 0) end return -1 end
if credits and credits < cost then return {1, credits, left(used)} end
if qk and used >= limit then return {2, credits or -1, left(used)} end
if credits then
  credits = credits - cost
  redis.call('HSET', crkey(id), 'remaining', num(credits))
end
if qk then
  used = redis.call('INCR', qk)
  if used == 1 then redis.call('EXPIRE', qk, ARGV[9]) end
end
return {0, credits or -1, left(used)}
