-- ARGV: P, now, hash hex…. For each hash in order, what find_by_hash answers for it (a nil
-- reply where it answers none): the background refreshes' batches in one call.
local out = {}
for i = 3, #ARGV do
  out[#out + 1] = by_hash(ARGV[i], ARGV[2]) or false
end
return out
