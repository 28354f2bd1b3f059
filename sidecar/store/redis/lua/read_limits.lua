-- Reads, without writing, what each limit has used and when it resets, and what each prepaid
-- credit has granted and left (for the usage document).
-- KEYS/ARGV: the request of lib.lua's parse_request, without a usage hash (amounts are 0).
-- Returns {1, time_s, time_us, then per limit: used, reset_us, then per credit: granted, balance};
-- a calendar window that does not contain the store's time reads as stale: {-1, time_s, time_us}.
local t, now_s, frac_us, now_us = store_clock()
local req = parse_request()
local early = cannot_run(req, t, now_s, now_us)  -- no deadline is given for a read
if early then return early end
local reply = {1, t[1], t[2]}
for _, l in ipairs(req.limits) do
  read_limit(l, now_s, now_us, frac_us)
  reply[#reply + 1] = l.used
  reply[#reply + 1] = l.reset
end
for _, c in ipairs(req.credits) do
  read_credit(c, now_s)
  reply[#reply + 1] = c.granted
  reply[#reply + 1] = c.balance
end
return reply
