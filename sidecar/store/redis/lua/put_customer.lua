-- Store one customer and bump the stored customers' version, atomically, so a replica that sees
-- the new version reads a hash that has the customer (admission/customers.py polls the version).
-- KEYS: the customers hash, the version counter. ARGV: customer id, its JSON document.
-- Returns the new version.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('INCR', KEYS[2])
