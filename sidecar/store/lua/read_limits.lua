-- Reads, without writing, what each limit has used and when it resets, and what each prepaid
-- credit has granted and left (for the usage document).
-- KEYS/ARGV: the request of lib.lua's parse_request, without a usage hash (amounts are 0).
-- Returns {1, time_s, time_us, then per limit: used, reset_us, then per credit: granted, balance};
-- a calendar window that does not contain the store's time reads as stale: {-1, time_s, time_us}.
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local frac_us = tonumber(t[2])
local now_us = now_s * 1000000 + frac_us
local req = parse_request()
if stale(req, now_s) then return {-1, t[1], t[2]} end
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
