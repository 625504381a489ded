-- ARGV: P, t, id, updated_at, by ('admin' or 'client'), leak (a leak report's JSON object or
-- ''), n, n strings of field/value pairs to set, then the names of the fields to remove
-- (attributes set to none). Sets only those fields,
-- on the key as it is now, and raises updated_at; the hashes and every field not named stay as
-- they are. Who set each constraint (disabled_by, expires_set_by, rate_limit_set_by) follows
-- the rules of KeyPatch::setters (src/keys/store.rs), judged on the key as it is now: a
-- client's patch that would loosen an admin's constraint writes nothing. A disable moves the
-- token generation on (next_generation). Answers {1, the key's
-- fields after the write}, {-4, constraint} when refused, or nil when there is no such key.
local PATCHABLE = {name = true, enabled = true, permissions = true, expires_at = true,
                   rate_limit = true, metadata = true}
local id, by = ARGV[3], ARGV[5]
local k = kkey(id)
if redis.call('EXISTS', k) == 0 then return nil end
local n = tonumber(ARGV[7])
local set, clear, new = {}, {}, {}
for j = 1, n do set[j] = ARGV[7 + j] end
for j = 8 + n, #ARGV do clear[#clear + 1] = ARGV[j] end
for j = 1, n, 2 do
  if not PATCHABLE[set[j]] then return redis.error_reply('not a patchable field') end
  new[set[j]] = set[j + 1]
end
for _, f in ipairs(clear) do
  if not PATCHABLE[f] then return redis.error_reply('not a patchable field') end
  new[f] = false
end

-- Who set each constraint now; a constraint without a recorded setter (written before setters
-- were recorded) counts as an admin's.
local cur = redis.call('HMGET', k, 'enabled', 'disabled_by', 'expires_at', 'expires_set_by',
                       'rate_limit', 'rate_limit_set_by')
local function known(has, who)
  if not has then return false end
  return who or 'admin'
end
local setters = {
  disabled_by = known(cur[1] == '0', cur[2]),
  expires_set_by = known(cur[3] ~= false, cur[4]),
  rate_limit_set_by = known(cur[5] ~= false, cur[6]),
}
local client = by == 'client'
-- The setter of a constraint this patch sets: an admin's stays the admin's.
local function setter(was)
  if was == 'admin' then return 'admin' end
  return by
end

if new.enabled == '1' then
  if client and setters.disabled_by == 'admin' then return {-4, 'disabled'} end
  setters.disabled_by = false
elseif new.enabled == '0' then
  setters.disabled_by = setter(setters.disabled_by)
end
if new.expires_at ~= nil then
  local admins = client and setters.expires_set_by == 'admin'
  if new.expires_at == false then
    if admins then return {-4, 'expiry'} end
    setters.expires_set_by = false
  else
    if admins and tonumber(new.expires_at) > tonumber(cur[3]) then return {-4, 'expiry'} end
    setters.expires_set_by = setter(setters.expires_set_by)
  end
end
if new.rate_limit ~= nil then
  if client and setters.rate_limit_set_by == 'admin' then return {-4, 'rate_limit'} end
  if new.rate_limit == false then
    setters.rate_limit_set_by = false
  else
    setters.rate_limit_set_by = setter(setters.rate_limit_set_by)
  end
end

if n > 0 then redis.call('HSET', k, unpack(set)) end
if #clear > 0 then redis.call('HDEL', k, unpack(clear)) end
for name, who in pairs(setters) do
  if who then redis.call('HSET', k, name, who) else redis.call('HDEL', k, name) end
end
if new.enabled == '0' then next_generation(id, ARGV[4]) end
touch(id, ARGV[4])
index_expiry(id)
local after = redis.call('HGETALL', k)
emit('key.updated', id, 'key', after)
local disabled = new.enabled == '0' and cur[1] ~= '0'
if disabled then
  emit('key.revoked', id, 'key', after, '{"reason":"disabled"}')
end
-- A leak report acted on: key.leaked in the same step (KeyPatch::leak, outbox::patch_events).
if ARGV[6] ~= '' then
  local leak = cjson.decode(ARGV[6])
  if disabled then
    leak.action = 'revoked'
  elseif cur[1] == '0' then
    leak.action = 'already_disabled'
  else
    leak.action = 'notified'
  end
  emit('key.leaked', id, 'key', after, cjson.encode(leak))
end
publish(ARGV[2], {id}, hashes_of(id))
return {1, after}
