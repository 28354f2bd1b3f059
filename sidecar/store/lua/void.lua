-- Undoes a metering call that the sidecar answered 503 (store_failure: closed) without knowing
-- whether the store had run it: the call was sent, and its reply was lost with the connection or
-- came after the store timeout. If the call wrote, its record (lib.lua remember_call) holds the
-- steps that undo it, and taking the record makes a second void of the same call do nothing.
-- All or nothing: when the billing usage it added has already moved to the outbox (close.lua
-- closed its window first), billing has the request, so its limits and credit keep it too:
-- billed and counted stay equal.
--
-- KEYS[1]: the prefix of the customer's call records.
-- ARGV: the call's connection token, sequence number, and deadline (store microseconds).
-- Returns 1 undone, 0 the call wrote nothing, 2 left as it is: its usage was billed already,
-- -1 too early: the call's deadline has not passed, so it may still run; nothing written, try
-- again later.
local _, _, _, now_us = store_clock()
if now_us <= tonumber(ARGV[3]) then return -1 end
local steps = take_call(KEYS[1], ARGV[1], tonumber(ARGV[2]))
if not steps then return 0 end
for _, step in ipairs(steps) do
  local kind = step[1]
  if kind == 'u' or kind == 'x' then
    local left = tonumber(redis.call('HGET', step[2], step[3]) or '0')
    if left < tonumber(step[4] or '1') then return 2 end
  end
end
undo(steps)
return 1
