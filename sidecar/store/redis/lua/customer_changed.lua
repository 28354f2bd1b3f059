-- Tell every replica what changed: one entry in the changes stream, which each replica's
-- directory reads (blocking XREAD) and drops from its cache. Entries older than ARGV[1] ms are
-- trimmed as this one is added: a replica that far behind drops its whole cache instead.
-- KEYS: the stream. ARGV: the oldest entry to keep (ms), then the entry's field/value pairs.
-- Returns the new entry's id.
return redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[1], '*', unpack(ARGV, 2))
