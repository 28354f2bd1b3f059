-- Claim an API key for a customer, fleet-wide. Each key hash is a key of its own (a Cluster
-- spreads them), holding "<customer> <token> <claimed at ms>". A free key, or one the customer
-- holds already, is stamped with this write's token; one another customer holds is left alone,
-- unless it still holds exactly ARGV[3]: a claim the caller found stale (its owner's document
-- does not list the key, and it is older than any write may take).
-- KEYS: the key's owner entry. ARGV: customer id, token, the stale entry it may replace ('' none).
-- Returns {1, now (ms), the entry before or ''} when claimed, {0, now (ms), the entry that holds it}
-- when not.
local held = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if held and held ~= ARGV[3] and string.match(held, '^(%S+)') ~= ARGV[1] then
  return {0, now, held}
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. string.format('%d', now))
return {1, now, held or ''}
