-- ARGV: P, key id, cost ('' = the key is not charged credits), calendar day, month, day of
-- month, quota key suffix ('' = no quota), quota limit, quota ttl seconds, now (ms), client id,
-- quota period name, quota period index.
-- Charges credits and quota together or not at all, and writes the quota.threshold events the
-- charge crosses (src/keys/threshold.rs) in the same step. Answers {status, credits|-1,
-- quota|-1}: status 0 charged, 1 credits short, 2 quota used up (-1: none).
local id = ARGV[2]
local credits, cv = nil, nil
if ARGV[3] ~= '' then credits, cv = current_credits(id, ARGV[4], ARGV[5], ARGV[6]) end
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
  -- The amount: the refill's, else the balance after the last set/add.
  local amount = tonumber(cv[2] or cv[6] or '0')
  local alerted = tonumber(cv[7] or '0')
  if amount > 0 and alerted < 100 then
    local spent = math.max(amount - credits, 0)
    local to, client = alerted, nil
    for _, pct in ipairs({80, 100}) do
      if pct > alerted and spent >= mark(amount, pct) then
        client = client or redis.call('HGET', kkey(id), 'client_id')
        if client then
          to = pct
          emit_threshold(id, ARGV[10], {'kind', 'credits', 'client', client, 'key', id,
            'threshold', pct, 'limit', num(amount), 'used', num(spent),
            'interval', cv[3] or '', 'day', cv[4] or ''})
        end
      end
    end
    if to ~= alerted then redis.call('HSET', crkey(id), 'alerted', to) end
  end
end
if qk then
  local before = used
  used = redis.call('INCR', qk)
  if used == 1 then redis.call('EXPIRE', qk, ARGV[9]) end
  for _, pct in ipairs({80, 100}) do
    local m = mark(limit, pct)
    if limit > 0 and before < m and m <= used then
      emit_threshold(ARGV[11], ARGV[10], {'kind', 'quota', 'client', ARGV[11],
        'threshold', pct, 'limit', num(limit), 'used', num(used), 'per', ARGV[12],
        'index', ARGV[13]})
    end
  end
end
return {0, credits or -1, left(used)}
