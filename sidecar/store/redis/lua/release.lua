-- Ends leases taken by claim.lua, each only if nobody rescheduled its member meanwhile (its score
-- is still the lease's end): then it is removed (new score '') or rescheduled to the new score.
-- KEYS: the schedule. ARGV: triples member, lease end, new score or '' (a round's customers in one
-- call). Returns how many members changed.
local changed = 0
for a = 1, #ARGV, 3 do
  if redis.call('ZSCORE', KEYS[1], ARGV[a]) == ARGV[a + 1] then
    if ARGV[a + 2] == '' then
      redis.call('ZREM', KEYS[1], ARGV[a])
    else
      redis.call('ZADD', KEYS[1], ARGV[a + 2], ARGV[a])
    end
    changed = changed + 1
  end
end
return changed
