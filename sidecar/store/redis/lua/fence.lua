-- Fences a customer's billing windows for one void a journal keeps (a 503 whose metering call may
-- have run; see void.lua): close.lua moves nothing while the fence has a member. A fence is
-- needed while the call may still run (its deadline has not passed) or its record says it ran;
-- otherwise there is nothing to undo, and the member is taken out.
--
-- KEYS[1]: that sidecar's list of the customer's call records, KEYS[2]: the customer's void fence.
-- ARGV: the call's number, its deadline (store microseconds), its fence member, seconds the fence
-- lasts unless renewed.
-- Returns 1 fenced, 0 not needed.
local _, _, _, now_us = store_clock()
if now_us <= tonumber(ARGV[2]) or find_call(KEYS[1], tonumber(ARGV[1])) then
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  return 1
end
redis.call('SREM', KEYS[2], ARGV[3])
return 0
