-- ARGV: P, t, max keys per client (0 = unlimited), atomic ('1' | '0'), judge ('1': write
-- nothing), m, then m pairs: client id, keys already accepted for it earlier in the same import
-- (judge passes of the chunks before), then n, then n keys.
-- One chunk of Store::import_keys: each key is judged in order (its client exists, neither of
-- its hashes is stored, its client stays within max); unless judging only, or atomic and one
-- was refused, the accepted ones are written, each with its key.created event
-- (data.imported = true) in this same script. Duplicates within the import are found by the
-- gateway before. Answers the refusals as a flat list of {index in the chunk (0-based), code}:
-- 1 no client, 2 duplicate, 3 too many keys.
local max, atomic, judge = tonumber(ARGV[3]), ARGV[4] == '1', ARGV[5] == '1'
local m = tonumber(ARGV[6])
local earlier = {}
for j = 0, m - 1 do earlier[ARGV[7 + 2 * j]] = tonumber(ARGV[8 + 2 * j]) end
local i = 7 + 2 * m
local n = tonumber(ARGV[i])
local keys = {}
i = i + 1
for j = 1, n do keys[j], i = read_key(i) end
local counts, accepted, refused = {}, {}, {}
for j, k in ipairs(keys) do
  local c = counts[k.client]
  if c == nil then
    if redis.call('EXISTS', ckey(k.client)) == 0 then c = false
    else c = redis.call('ZCARD', ckeys(k.client)) + (earlier[k.client] or 0) end
    counts[k.client] = c
  end
  if c == false then
    append(refused, {j - 1, 1})
  elseif check_new(k) then
    append(refused, {j - 1, 2})
  elseif max > 0 and c >= max then
    append(refused, {j - 1, 3})
  else
    counts[k.client] = c + 1
    accepted[#accepted + 1] = k
  end
end
if judge or (atomic and #refused > 0) then return refused end
local ids, hashes = {}, {}
for _, k in ipairs(accepted) do
  insert_key(k)
  emit('key.created', k.id, 'key', redis.call('HGETALL', kkey(k.id)), '{"imported":true}')
  ids[#ids + 1] = k.id
  append(hashes, key_hashes(k))
end
if #ids > 0 then publish(ARGV[2], ids, hashes) end
return refused
