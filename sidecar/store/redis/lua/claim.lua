-- Leases up to ARGV[3] members of a schedule (a sorted set scored by when each is due, in ms):
-- every member due at or before ARGV[1] is rescheduled to ARGV[2], the lease's end, so no other
-- replica takes it until then; a replica that dies mid-work leaves it to be taken after the lease.
-- KEYS: the schedule. Returns the members leased.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], member)
end
return due
