-- Charges what only the response told (tokens, bytes, time) to every limit it applies to, and
-- records it for billing. Never refuses: the request was admitted while the balance was above
-- zero, and the overshoot is bounded by what requests already in flight use (SPEC section 5).
--
-- KEYS, ARGV: as check_and_meter.lua (the ceiling and mode of each limit are ignored).
-- Returns {1, time_s, time_us}, or {-1, time_s, time_us} when a calendar window given does not
-- contain the store's time (nothing written; recompute and call again).
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_us = now_s * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local a = 3 + i * 6
  if ARGV[a] == 'c' and (now_s < tonumber(ARGV[a + 4]) or now_s >= tonumber(ARGV[a + 5])) then
    return {-1, t[1], t[2]}
  end
end
local k = 1
for i = 0, n - 1 do
  local a = 3 + i * 6
  local amount, p1, p2 = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  if ARGV[a] == 'r' then
    local used, expired_entries = rate_used(KEYS[k], KEYS[k + 1], now_us - p1)
    charge_rate(KEYS[k], KEYS[k + 1], now_us, p1, amount, used, expired_entries)
    k = k + 2
  else
    charge_calendar(KEYS[k], p2, amount)
    k = k + 1
  end
end
record_usage(KEYS[k], now_s - now_s % tonumber(ARGV[1]), 3 + n * 6)
return {1, t[1], t[2]}
