-- Store customers' documents, each replacing the one before (a deleted one included), and cancel
-- a purge it was waiting for. Their keys were claimed first (customer_claim.lua); a write slower
-- than ARGV[1] ms since its first claim writes nothing, since a claim that old may have been
-- taken over as stale. One call stores several customers (all of one slot on a Cluster).
-- KEYS: per customer, its document and its purge marker. ARGV: the longest a write may take (ms),
-- then per customer: its first claim (ms; 0 when it claimed no key), the claims' token, its key
-- hashes space-separated ('' for none; each becomes a field valued with the token), the number n
-- of its other fields, and those n field/value pairs.
-- Returns per customer {1, the document before as a field/value list}, or {0} when too slow.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local longest = tonumber(ARGV[1])
local at = 2
local replies = {}
for i = 1, #KEYS, 2 do
  local first, token, hashes, n = tonumber(ARGV[at]), ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3])
  local fields = {unpack(ARGV, at + 4, at + 3 + 2 * n)}
  at = at + 4 + 2 * n
  for hash in string.gmatch(hashes, '%S+') do
    fields[#fields + 1] = hash
    fields[#fields + 1] = token
  end
  if first > 0 and now - first > longest then
    replies[#replies + 1] = {0}
  else
    local before = redis.call('HGETALL', KEYS[i])
    redis.call('DEL', KEYS[i], KEYS[i + 1])
    redis.call('HSET', KEYS[i], unpack(fields))
    replies[#replies + 1] = {1, before}
  end
end
return replies
