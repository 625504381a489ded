-- ARGV: P, t, n, then n triples: type, okey, body. Writes events whose body is already built
-- (key.leaked, quota.threshold).
local n = tonumber(ARGV[3])
for j = 0, n - 1 do
  redis.call('XADD', EVENTS, '*', 'type', ARGV[4 + 3 * j], 'okey', ARGV[5 + 3 * j], 't', ARGV[2],
             'body', ARGV[6 + 3 * j])
end
return n
