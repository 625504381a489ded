-- ARGV: P, instance, n, then n times: bucket name, t (µs), tau (µs), cells given back, demand,
-- want ('1' | '0'). Cluster rate limits (see keys/cluster.rs): one GCRA `tat` per bucket on
-- Redis's clock; unused cells go back, and a lease of floor(room × share) cells is reserved
-- by moving `tat` on (at most room ÷ live instances at a time). Answers {live instances, lease, µs until full, lease, …}.
-- Unused cells go back only as far as the instance's last lease still lies ahead of now (its
-- end is kept per instance in `rll:`, until the hash expires): a lease whose time has passed
-- came back by itself, and moving `tat` back for it again would free cells another instance
-- reserved since.
-- The first answer is the fleet: every instance seen in the last 3 s, those with no bucket to
-- sync included (they call with n = 0 every second), which is what each instance divides a
-- limit by while Redis is unreachable. A lease is divided only between the instances that
-- synced buckets in the last second (`live`).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local me = ARGV[2]
local n = tonumber(ARGV[3])
local members = P .. 'rl_members'
redis.call('ZADD', members, now, me)
redis.call('ZREMRANGEBYSCORE', members, '-inf', now - 10000000)
redis.call('PEXPIRE', members, 60000)
local inst = P .. 'rl_instances'
if n > 0 then
  redis.call('ZADD', inst, now, me)
  redis.call('ZREMRANGEBYSCORE', inst, '-inf', now - 10000000)
  redis.call('PEXPIRE', inst, 60000)
end
local live = redis.call('ZCOUNT', inst, now - 1000000, '+inf')
local out = {redis.call('ZCOUNT', members, now - 3000000, '+inf')}
for i = 0, n - 1 do
  local b = 4 + i * 6
  local name, T, tau = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local unused, demand, want = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), ARGV[b + 5] == '1'
  local k, dk, lk = P .. 'rl:' .. name, P .. 'rld:' .. name, P .. 'rll:' .. name
  local tat = tonumber(redis.call('GET', k) or '0')
  if tat < now then tat = now end
  -- Every write leaves tat at most tau + T ahead; further ahead, Redis's clock stepped back
  -- (or a promoted replica's runs behind): the bucket is empty, not empty for that long too.
  if tat > now + tau + T then tat = now + tau + T end
  local ends = tonumber(redis.call('HGET', lk, me) or '0')
  local back = math.min(unused, math.max(0, math.floor((ends - now) / T)))
  tat = math.max(now, tat - back * T)
  local lease = 0
  if want then
    redis.call('HSET', dk, me, string.format('%.0f', demand) .. ':' .. string.format('%.0f', now))
    local all = redis.call('HGETALL', dk)
    local total = 0
    for j = 1, #all, 2 do
      local d, at = string.match(all[j + 1], '([^:]+):([^:]+)')
      if tonumber(at) >= now - 1000000 then
        total = total + tonumber(d)
      else
        redis.call('HDEL', dk, all[j])
      end
    end
    redis.call('PEXPIRE', dk, 10000)
    local share
    if total > 0 then share = demand / total else share = 1 / math.max(live, 1) end
    local room = math.floor((now + tau + T - tat) / T)
    if room > 0 then
      -- At most an even part of the room at a time, so that an instance asking first does
      -- not take what the others are about to ask for (it asks again at its next sync).
      lease = math.min(math.floor(room * share), math.max(1, math.floor(room / math.max(live, 1))))
      -- A lone cell goes to whoever asks while others have none to ask for.
      if lease == 0 and demand > 0 and room >= 1 then lease = 1 end
      tat = tat + lease * T
    end
  else
    redis.call('HDEL', dk, me)
  end
  -- A call that leases nothing leaves the instance's last lease end as it is: an instance's
  -- calls overlap (its sync loop's and a request's own ask), and the cells of a lease it got
  -- from one may still be held when another gets none; forgetting the end would cap their
  -- give-back at 0 and lose them until their time passed.
  if lease > 0 then
    redis.call('HSET', lk, me, string.format('%.0f', tat))
  end
  local ttl = math.ceil((tat - now + tau + T) / 1000) + 1000
  redis.call('SET', k, string.format('%.0f', tat), 'PX', ttl)
  if lease > 0 then redis.call('PEXPIRE', lk, ttl) end
  out[#out + 1] = lease
  out[#out + 1] = math.floor(tat - now)
end
return out
