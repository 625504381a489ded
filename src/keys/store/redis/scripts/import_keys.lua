-- ARGV: P, t, max keys per client (0 = unlimited), atomic ('1' | '0'), n, then n keys.
-- Store::import_keys in one step: each key is judged in order (its client exists, neither of
-- its hashes is stored or earlier in the call, its client stays within max); the accepted ones
-- are written, each with its key.created event (data.imported = true), unless the import is
-- atomic and one was refused, then nothing is written. Answers the refusals as a flat list of
-- {index (0-based), code}: 1 no client, 2 duplicate, 3 too many keys.
local max, atomic, n = tonumber(ARGV[3]), ARGV[4] == '1', tonumber(ARGV[5])
local keys, i = {}, 6
for j = 1, n do keys[j], i = read_key(i) end
local counts, seen, accepted, refused = {}, {}, {}, {}
for j, k in ipairs(keys) do
  local c = counts[k.client]
  if c == nil then
    if redis.call('EXISTS', ckey(k.client)) == 0 then c = false
    else c = redis.call('ZCARD', ckeys(k.client)) end
    counts[k.client] = c
  end
  local dup = false
  for _, h in ipairs(key_hashes(k)) do if seen[h] then dup = true end end
  if c == false then
    append(refused, {j - 1, 1})
  elseif dup or check_new(k) then
    append(refused, {j - 1, 2})
  elseif max > 0 and c >= max then
    append(refused, {j - 1, 3})
  else
    counts[k.client] = c + 1
    for _, h in ipairs(key_hashes(k)) do seen[h] = true end
    accepted[#accepted + 1] = k
  end
end
if atomic and #refused > 0 then return refused end
local ids, hashes = {}, {}
for _, k in ipairs(accepted) do
  insert_key(k)
  emit('key.created', k.id, 'key', redis.call('HGETALL', kkey(k.id)), '{"imported":true}')
  ids[#ids + 1] = k.id
  append(hashes, key_hashes(k))
end
if #ids > 0 then publish(ARGV[2], ids, hashes) end
return refused
