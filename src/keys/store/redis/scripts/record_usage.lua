-- ARGV: P, the flush's id and the chunk's place in it, then id/time/day/count quadruples.
-- Raises last_used_at, adds to the day's count; unknown ids are skipped. A chunk sent again
-- (its answer was lost after it ran) is applied once: one bit per chunk of a flush, kept a day.
local mark = P .. 'flushed:' .. ARGV[2]
local seen = redis.call('SETBIT', mark, ARGV[3], 1)
redis.call('EXPIRE', mark, 86400)
if seen == 1 then return 0 end
for i = 4, #ARGV, 4 do
  local key = kkey(ARGV[i])
  if redis.call('EXISTS', key) == 1 then
    local cur = redis.call('HGET', key, 'last_used_at')
    if not cur or tonumber(cur) < tonumber(ARGV[i + 1]) then
      redis.call('HSET', key, 'last_used_at', ARGV[i + 1])
    end
    redis.call('HINCRBY', ukey(ARGV[i]), ARGV[i + 2], ARGV[i + 3])
  end
end
return 1
