-- A page of one listing bucket: up to ARGV[3] ids in (ARGV[1], ARGV[2]] in id order.
-- KEYS: the bucket. ARGV: the lower bound ('(id' or '-'), the upper bound ('[id' or '+'), count.
return redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
