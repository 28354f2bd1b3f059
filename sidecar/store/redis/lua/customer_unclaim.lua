-- Give back an API key's claim: only if the entry is still the one this customer's write stamped
-- (same token), since a later write that re-stamped it keeps it. The entry is deleted, or put
-- back to ARGV[3] (what it held before an undone claim re-stamped it).
-- KEYS: the key's owner entry. ARGV: customer id, token, the entry to put back ('' to delete).
-- Returns 1 when given back, else 0.
local held = redis.call('GET', KEYS[1])
if held and string.match(held, '^(%S+ %S+)') == ARGV[1] .. ' ' .. ARGV[2] then
  if ARGV[3] == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
  return 1
end
return 0
