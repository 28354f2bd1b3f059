-- Ends a lease taken by claim.lua, only if nobody rescheduled the member meanwhile (its score is
-- still the lease's end): then it is removed (ARGV[3] == '') or rescheduled to ARGV[3].
-- KEYS: the schedule. ARGV: member, lease end, new score or ''. Returns 1 if changed, else 0.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
