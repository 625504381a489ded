-- ARGV: P, then id/time pairs. Keeps the latest time; unknown ids are skipped.
for i = 2, #ARGV, 2 do
  local key = kkey(ARGV[i])
  if redis.call('EXISTS', key) == 1 then
    local cur = redis.call('HGET', key, 'last_used_at')
    if not cur or tonumber(cur) < tonumber(ARGV[i + 1]) then
      redis.call('HSET', key, 'last_used_at', ARGV[i + 1])
    end
  end
end
return 1
