-- Store one customer's document, replacing the one before (a deleted one included), and cancel
-- a purge it was waiting for. Its keys were claimed first (customer_claim.lua); a write slower
-- than ARGV[2] ms since its first claim writes nothing, since a claim that old may have been
-- taken over as stale.
-- KEYS: the document, the purge marker. ARGV: first claim (ms; 0 when it claimed no key), the
-- longest a write may take (ms), then the document's field/value pairs.
-- Returns {1, the document before as a field/value list}, or {0} when too slow.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local first = tonumber(ARGV[1])
if first > 0 and now - first > tonumber(ARGV[2]) then
  return {0}
end
local before = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return {1, before}
