-- Shared by every script: key names, reading a key from ARGV, index maintenance, publishing.
local P = ARGV[1]
local function kkey(id) return P .. 'key:' .. id end
local function ukey(id) return P .. 'usage:' .. id end
local function crkey(id) return P .. 'credits:' .. id end
local function hkey(h) return P .. 'h:' .. h end
local function ckey(c) return P .. 'client:' .. c end
local function ckeys(c) return P .. 'client_keys:' .. c end
local ALL_KEYS = P .. 'keys'
local ALL_CLIENTS = P .. 'clients'
-- Enabled keys with an expiry, scored by it (for key.expiring).
local EXPIRIES = P .. 'expiries'

-- Keeps a key's place in EXPIRIES in step with its expires_at and enabled.
local function index_expiry(id)
  local v = redis.call('HMGET', P .. 'key:' .. id, 'expires_at', 'enabled')
  if v[1] and v[2] ~= '0' then
    redis.call('ZADD', EXPIRIES, v[1], id)
  else
    redis.call('ZREM', EXPIRIES, id)
  end
end

local function append(t, items) for _, v in ipairs(items) do t[#t + 1] = v end return t end

-- The current and previous hash of a stored key.
local function hashes_of(id)
  local v = redis.call('HMGET', kkey(id), 'key_hash', 'previous_hash')
  local out = {}
  if v[1] then out[#out + 1] = v[1] end
  if v[2] then out[#out + 1] = v[2] end
  return out
end

-- A key sent by the gateway at ARGV[i]: id, client_id, created_at, key_hash, previous_hash
-- ('' = none), n, then n strings of field/value pairs. Returns it and the next index.
local function read_key(i)
  local k = {id = ARGV[i], client = ARGV[i + 1], created = ARGV[i + 2], h = ARGV[i + 3],
             ph = ARGV[i + 4], fields = {}}
  local n = tonumber(ARGV[i + 5])
  for j = 1, n do k.fields[j] = ARGV[i + 5 + j] end
  return k, i + 6 + n
end

-- Raises a stored key's updated_at to t; it never moves back (instances' clocks differ a little).
local function touch(id, t)
  local cur = redis.call('HGET', kkey(id), 'updated_at')
  if not cur or tonumber(cur) < tonumber(t) then redis.call('HSET', kkey(id), 'updated_at', t) end
end

-- Moves a stored key's token generation on, so that every token minted from it before is
-- refused for good: to t, and always past the current one (a key written before generations
-- were kept starts from its rotated_at, which its tokens carry).
local function next_generation(id, t)
  local cur = redis.call('HGET', kkey(id), 'tokens_valid_after')
    or redis.call('HGET', kkey(id), 'rotated_at') or '0'
  local nxt = math.max(tonumber(cur) + 1, tonumber(t))
  redis.call('HSET', kkey(id), 'tokens_valid_after', string.format('%.0f', nxt))
end

local function key_hashes(k)
  local out = {k.h}
  if k.ph ~= '' then out[2] = k.ph end
  return out
end

-- -3 when the new key's id or one of its hashes is taken; checked before any write.
local function check_new(k)
  if redis.call('EXISTS', kkey(k.id)) == 1 then return -3 end
  for _, h in ipairs(key_hashes(k)) do
    if redis.call('EXISTS', hkey(h)) == 1 then return -3 end
  end
  return nil
end

local function insert_key(k)
  redis.call('HSET', kkey(k.id), 'id', k.id, 'client_id', k.client, 'created_at', k.created,
             unpack(k.fields))
  for _, h in ipairs(key_hashes(k)) do redis.call('SET', hkey(h), k.id) end
  redis.call('ZADD', ckeys(k.client), k.created, k.id)
  redis.call('ZADD', ALL_KEYS, k.created, k.id)
  index_expiry(k.id)
end

local function remove_key(id, client)
  for _, h in ipairs(hashes_of(id)) do
    if redis.call('GET', hkey(h)) == id then redis.call('DEL', hkey(h)) end
  end
  redis.call('DEL', kkey(id))
  redis.call('DEL', ukey(id))
  redis.call('DEL', crkey(id))
  redis.call('ZREM', ckeys(client), id)
  redis.call('ZREM', ALL_KEYS, id)
  redis.call('ZREM', EXPIRIES, id)
  redis.call('DEL', P .. 'expiry_notices:' .. id)
end

local function quoted(items)
  if #items == 0 then return '' end
  return '"' .. table.concat(items, '","') .. '"'
end

-- One invalidation message: the writer's timestamp, key ids and hashes (hex).
local function publish(t, ids, hashes)
  redis.call('PUBLISH', P .. 'invalidate',
    '{"t":' .. t .. ',"ids":[' .. quoted(ids) .. '],"hashes":[' .. quoted(hashes) .. ']}')
end

local function record(id)
  local rec = redis.call('HGETALL', kkey(id))
  if #rec == 0 then return nil end
  local client = redis.call('HGET', kkey(id), 'client_id')
  local license = redis.call('HGET', ckey(client), 'license')
  if not license then return nil end
  -- The credit terms, when the key has credits: {amount|'', interval|'', day|''}.
  local cr = redis.call('HMGET', crkey(id), 'remaining', 'amount', 'interval', 'day')
  if not cr[1] then return {license, rec} end
  return {license, rec, {cr[2] or '', cr[3] or '', cr[4] or ''}}
end

-- The record of the key whose current hash, or previous hash within its grace period at `now`,
-- is `h` (hex); nil when there is none.
local function by_hash(h, now)
  local id = redis.call('GET', hkey(h))
  if not id then return nil end
  local v = redis.call('HMGET', kkey(id), 'key_hash', 'previous_hash', 'previous_valid_until')
  if v[1] ~= h then
    if v[2] ~= h or not v[3] or tonumber(v[3]) <= tonumber(now) then return nil end
  end
  return record(id)
end

-- The refill period of credits with `interval`/`day` given the calendar (ARGV-style strings:
-- days since the epoch, months since year 0, day of the month); nil without a refill.
local function refill_period(interval, day, cal_day, cal_month, dom)
  if interval == 'daily' then return tonumber(cal_day) end
  if interval == 'monthly' then
    local d = tonumber(day) or 1
    if tonumber(dom) < d then return tonumber(cal_month) - 1 end
    return tonumber(cal_month)
  end
  return nil
end

local function num(n) return string.format('%.0f', n) end

-- A key's credits, refilled when a refill period started since they were written (the
-- write is made, and the quota.threshold state starts again): remaining (number) or nil when
-- the key has no credits; then the stored fields {remaining, amount, interval, day, period,
-- base, alerted} (alerted already reset by a refill).
local function current_credits(id, cal_day, cal_month, dom)
  local v = redis.call('HMGET', crkey(id), 'remaining', 'amount', 'interval', 'day', 'period',
                       'base', 'alerted')
  if not v[1] then return nil end
  local remaining = tonumber(v[1])
  local p = refill_period(v[3], v[4], cal_day, cal_month, dom)
  if p and p > tonumber(v[5] or '0') then
    remaining = tonumber(v[2])
    redis.call('HSET', crkey(id), 'remaining', num(remaining), 'period', num(p), 'alerted', '0')
    v[7] = '0'
  end
  return remaining, v
end

-- The event outbox (webhooks): a stream written by the script that makes the change, so an
-- event exists exactly when its change does. Each entry: type, okey (what orders it: a key id or
-- a client id), t (the writer's clock), what ('key' or 'client'), rec (the record's fields as
-- a JSON array, after the change; before it for deletions) and extra (a JSON object of members
-- added to the event's data). The gateway builds the body from these (src/keys/store/redis).
local EVENTS = P .. 'events'
local function emit(kind, okey, what, rec, extra)
  if #rec == 0 then return end
  redis.call('XADD', EVENTS, '*', 'type', kind, 'okey', okey, 't', ARGV[2], 'what', what,
             'rec', cjson.encode(rec), 'extra', extra or '{}')
end

-- quota.threshold (src/keys/threshold.rs): the used count at which `pct` percent of `limit`
-- is reached, ceil(limit * pct / 100), exact in doubles for every amount keygate allows.
local function mark(limit, pct)
  return pct * math.floor(limit / 100) + math.ceil(pct * (limit % 100) / 100)
end

-- Writes a quota.threshold event; the gateway builds its body from these fields.
local function emit_threshold(okey, t, fields)
  redis.call('XADD', EVENTS, '*', 'type', 'quota.threshold', 'okey', okey, 't', t,
             'what', 'threshold', unpack(fields))
end
