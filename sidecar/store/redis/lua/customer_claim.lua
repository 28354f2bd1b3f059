-- Claim API keys for customers, fleet-wide. Each key hash is a key of its own (a Cluster spreads
-- them), holding "<customer> <token> <claimed at ms>". A free key, or one the customer holds
-- already, is stamped with the write's token; one another customer holds is left alone, unless
-- it still holds exactly the stale entry named: a claim the caller found stale (its owner's
-- document does not list the key, and it is older than any write may take).
-- One call claims several keys (all of one slot on a Cluster), each on its own, in order.
-- KEYS: the keys' owner entries. ARGV: per key, "<customer id> <token>", followed by " <the stale
-- entry it may replace>" when there is one.
-- Returns per key {1, now (ms), the entry before or ''} when claimed, {0, now (ms), the entry
-- that holds it} when not.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local stamp = string.format('%d', now)
local replies = {}
for i, key in ipairs(KEYS) do
  local customer, token, stale = string.match(ARGV[i], '^(%S+) (%S+) ?(.*)$')
  local held = redis.call('GET', key)
  if held and held ~= stale and string.match(held, '^(%S+)') ~= customer then
    replies[i] = {0, now, held}
  else
    redis.call('SET', key, customer .. ' ' .. token .. ' ' .. stamp)
    replies[i] = {1, now, held or ''}
  end
end
return replies
