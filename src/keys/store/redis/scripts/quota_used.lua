-- ARGV: P, quota key suffix. Answers the count (0 when none).
return tonumber(redis.call('GET', P .. 'quota:' .. ARGV[2]) or '0')
