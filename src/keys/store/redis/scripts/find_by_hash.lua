-- ARGV: P, hash hex, now. The key whose current hash, or previous hash within its grace
-- period, is the given one, with its client's license.
return by_hash(ARGV[2], ARGV[3])
