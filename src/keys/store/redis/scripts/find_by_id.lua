-- ARGV: P, id.
return record(ARGV[2])
