-- ARGV: P, t (now), then the notice windows in days, widest first. Writes key.expiring for each
-- enabled key of EXPIRIES whose expiry is within a window and that has no notice for that window
-- and expiry yet (`expiry_notices:<id>` holds "days:expires_at"); a notice is recorded for the
-- window and every wider one, so a key already within a day gets one event. Answers how many.
local now = tonumber(ARGV[2])
local days = {}
for j = 3, #ARGV do days[#days + 1] = tonumber(ARGV[j]) end
local DAY = 86400000
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', EXPIRIES, '(' .. now, now + days[1] * DAY)) do
  local exp = redis.call('HGET', kkey(id), 'expires_at')
  if exp then
    local left = tonumber(exp) - now
    local window = nil
    for _, d in ipairs(days) do
      if left <= d * DAY then window = d end
    end
    local notices = P .. 'expiry_notices:' .. id
    if window and redis.call('SISMEMBER', notices, window .. ':' .. exp) == 0 then
      for _, d in ipairs(days) do
        if d >= window then redis.call('SADD', notices, d .. ':' .. exp) end
      end
      emit('key.expiring', id, 'key', redis.call('HGETALL', kkey(id)), '{"days":' .. window .. '}')
      n = n + 1
    end
  end
end
return n
