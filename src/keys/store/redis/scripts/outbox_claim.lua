-- ARGV: P, now, lease ms, limit, scan, n, then n quadruples: webhook id, its event types as
-- ",a,b," (",*,"  for all), how many of its deliveries may be claimed now, 1 when the webhook is
-- one of the store's else 0 (configured); then the time before
-- which the event of a webhook not named must have happened for its delivery to be handed out
-- (left to the instances that know the webhook until then). Fans every event of
-- the stream out to the webhooks that want it (one delivery hash `d:<webhook>|<event>` per pair,
-- queued in `q:<webhook>|<okey>`, the queue scored in `events:due` by when its head is due) and
-- deletes it from the stream; then claims the heads of up to `limit` due queues, at most the
-- room of each webhook (a webhook not named has no such bound), looking at no
-- more than `scan` due queues, until now + lease (their score moves there, so no other caller
-- takes them before; the queue of a webhook not named, not yet an orphan, moves there too,
-- unclaimed). Answers {{delivery id, delivery fields}…}.
local now, lease, limit, scan, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), tonumber(ARGV[6])
local DUE, PENDING = P .. 'events:due', P .. 'events:pending'
local subs = {}
local room = {}
for j = 1, n do
  local id = ARGV[3 + 4 * j]
  room[id] = tonumber(ARGV[5 + 4 * j])
  if ARGV[6 + 4 * j] == '0' then subs[#subs + 1] = {id = id, ev = ARGV[4 + 4 * j]} end
end
-- The store's webhooks as they are now, not as the caller's list (read before) has them: one
-- made since gets the events written after its creation was answered, one deleted since gets
-- none, and a change of event types applies to every event written after it.
local hooks = redis.call('HGETALL', P .. 'webhooks')
for j = 1, #hooks, 2 do
  local w = cjson.decode(hooks[j + 1])
  subs[#subs + 1] = {id = hooks[j], ev = ',' .. table.concat(w.events, ',') .. ','}
end
local orphan_before = tonumber(ARGV[7 + 4 * n])
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
-- Claimed and emptied queues leave the due range; those skipped (no room) stay in it.
local skipped, seen = 0, 0
while #out < limit and seen < scan do
  local page = redis.call('ZRANGEBYSCORE', DUE, '-inf', now, 'LIMIT', skipped,
                          math.min(200, scan - seen))
  if #page == 0 then break end
  for _, q in ipairs(page) do
    seen = seen + 1
    if #out >= limit then break end
    local w = string.match(q, '^(.-)|')
    local left = room[w]
    if left == 0 then
      skipped = skipped + 1
    else
      local d = redis.call('LINDEX', P .. 'q:' .. q, 0)
      if not d then
        redis.call('ZREM', DUE, q)
      elseif not left and tonumber(redis.call('HGET', P .. 'd:' .. d, 't')) >= orphan_before then
        -- A webhook this caller does not know (removed, or new in a rolling deploy): left to
        -- those that know it, for a lease, behind the queues due now; kept in place, a backlog
        -- of its queues filled every scan and starved every other webhook for a day.
        redis.call('ZADD', DUE, now + lease, q)
      else
        if left then room[w] = left - 1 end
        redis.call('ZADD', DUE, now + lease, q)
        out[#out + 1] = {d, redis.call('HGETALL', P .. 'd:' .. d)}
      end
    end
  end
end
return out
