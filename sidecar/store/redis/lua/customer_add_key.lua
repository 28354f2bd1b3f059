-- Add one API key to a stored customer, claimed first (customer_claim.lua) under ARGV[2]; a write
-- slower than ARGV[4] ms since the claim (ARGV[3]) writes nothing (see customer_put.lua).
-- KEYS: the document. ARGV: key hash, token, claimed at (ms), the longest a write may take (ms).
-- Returns 1 added, 2 the customer had it already (re-stamped), 0 no such customer, -1 too slow.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if now - tonumber(ARGV[3]) > tonumber(ARGV[4]) then
  return -1
end
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'd') == 1 then
  return 0
end
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 2
end
return 1
