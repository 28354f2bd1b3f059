-- Give back API keys' claims: each only if its entry is still the one this customer's write
-- stamped (same token), since a later write that re-stamped it keeps it. The entry is deleted, or
-- put back to what it held before an undone claim re-stamped it.
-- One call gives back several keys (all of one slot on a Cluster).
-- KEYS: the keys' owner entries. ARGV: per key, the customer id, the token, the entry to put back
-- ('' to delete). Returns per key 1 when given back, else 0.
local replies = {}
for i, key in ipairs(KEYS) do
  local owner, restore = ARGV[3 * i - 2] .. ' ' .. ARGV[3 * i - 1], ARGV[3 * i]
  local held = redis.call('GET', key)
  replies[i] = 0
  if held and string.match(held, '^(%S+ %S+)') == owner then
    if restore == '' then
      redis.call('DEL', key)
    else
      redis.call('SET', key, restore)
    end
    replies[i] = 1
  end
end
return replies
