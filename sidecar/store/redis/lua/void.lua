-- Undoes a metering call that the sidecar answered 503 (store_failure: closed) without knowing
-- whether the store had run it: the call was sent, and its reply was lost with the connection or
-- came after the store timeout. If the call wrote, its record (lib.lua remember_call) holds the
-- steps that undo it, and taking the record makes a second void of the same call do nothing.
-- All or nothing: when the billing usage it added has already moved to the outbox (close.lua
-- closed its window first), billing has the request, so its limits and credit keep it too:
-- billed and counted stay equal. Either way the void's fence on the customer's billing windows
-- (store/keys.py, void_fence) ends here.
--
-- KEYS[1]: that sidecar's list of the customer's call records, KEYS[2]: the customer's void fence.
-- ARGV: the call's number, its deadline (store microseconds), its fence member ("<token>:<seq>").
-- Returns 1 undone, 0 the call wrote nothing, 2 left as it is: its usage was billed already,
-- -1 too early: the call's deadline has not passed, so it may still run; nothing written, try
-- again later.
local _, _, _, now_us = store_clock()
if now_us <= tonumber(ARGV[2]) then return -1 end
redis.call('SREM', KEYS[2], ARGV[3])
local steps = take_call(KEYS[1], tonumber(ARGV[1]))
if not steps then return 0 end
for _, step in ipairs(steps) do
  local kind = step[1]
  local value = (kind == 'u' or kind == 'x' or kind == 'm') and redis.call('HGET', step[2], step[3])
  if kind == 'm' and not value then return 2 end
  if (kind == 'u' or kind == 'x') and tonumber(value or '0') < tonumber(step[4] or '1') then return 2 end
end
undo(steps)
return 1
