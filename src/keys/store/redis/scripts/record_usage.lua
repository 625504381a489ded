-- ARGV: P, then id/time/day/count quadruples. Raises last_used_at, adds to the day's count;
-- unknown ids are skipped.
for i = 2, #ARGV, 4 do
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
