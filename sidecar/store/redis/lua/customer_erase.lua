-- Erase keys of a customer being purged, unless the purge was cancelled meanwhile (a PUT took
-- the marker away), and at the end (ARGV[1] = '1') the tombstone and the marker themselves.
-- KEYS: the purge marker, the document, then keys of the customer to delete (one slot).
-- Returns how many keys were deleted, or -1 when the purge was cancelled.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local deleted = 0
for i = 3, #KEYS do
  deleted = deleted + redis.call('DEL', KEYS[i])
end
if ARGV[1] == '1' then
  if redis.call('HEXISTS', KEYS[2], 'd') == 1 then
    deleted = deleted + redis.call('DEL', KEYS[2])
  end
  redis.call('DEL', KEYS[1])
end
return deleted
