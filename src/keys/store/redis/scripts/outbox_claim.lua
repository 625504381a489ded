-- ARGV: P, now, lease ms, limit, n, then n pairs: webhook id, its event types as ",a,b," (",*,"
-- for all). Fans every event of the stream out to the webhooks that want it (one delivery hash
-- `d:<webhook>|<event>` per pair, queued in `q:<webhook>|<okey>`, the queue scored in
-- `events:due` by when its head is due) and deletes it from the stream; then claims the heads of
-- up to `limit` due queues until now + lease (their score moves there, so no other caller takes
-- them before). Answers {{delivery id, delivery fields}…}.
local now, lease, limit, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5])
local DUE, PENDING = P .. 'events:due', P .. 'events:pending'
local subs = {}
for j = 1, n do subs[j] = {id = ARGV[4 + 2 * j], ev = ARGV[5 + 2 * j]} end
local function wants(s, kind)
  return string.find(s.ev, ',*,', 1, true) or string.find(s.ev, ',' .. kind .. ',', 1, true)
end
for _, e in ipairs(redis.call('XRANGE', EVENTS, '-', '+', 'COUNT', 1000)) do
  local eid, f = e[1], e[2]
  local ev = {}
  for j = 1, #f, 2 do ev[f[j]] = f[j + 1] end
  for _, s in ipairs(subs) do
    if wants(s, ev.type) then
      local d, q = s.id .. '|' .. eid, s.id .. '|' .. ev.okey
      redis.call('HSET', P .. 'd:' .. d, 'webhook', s.id, 'event', eid, 'queue', q,
                 'attempts', 0, unpack(f))
      if redis.call('RPUSH', P .. 'q:' .. q, d) == 1 then redis.call('ZADD', DUE, ev.t, q) end
      redis.call('SADD', P .. 'wq:' .. s.id, q)
      redis.call('INCR', PENDING)
    end
  end
  redis.call('XDEL', EVENTS, eid)
end
local out = {}
for _, q in ipairs(redis.call('ZRANGEBYSCORE', DUE, '-inf', now, 'LIMIT', 0, limit)) do
  local d = redis.call('LINDEX', P .. 'q:' .. q, 0)
  if d then
    redis.call('ZADD', DUE, now + lease, q)
    out[#out + 1] = {d, redis.call('HGETALL', P .. 'd:' .. d)}
  else
    redis.call('ZREM', DUE, q)
  end
end
return out
