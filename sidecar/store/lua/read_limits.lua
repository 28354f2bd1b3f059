-- Reads, without writing, what each limit has used and when it resets (for the usage document).
-- KEYS/ARGV as check_and_meter.lua's limit part (amounts are ignored; 0 is passed).
-- Returns {1, time_s, time_us, then per limit: used, reset_us}; a calendar window that does not
-- contain the store's time reads as stale: {-1, time_s, time_us}.
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_us = now_s * 1000000 + tonumber(t[2])
local reply = {1, t[1], t[2]}
local k, a = 1, 3
for i = 1, tonumber(ARGV[2]) do
  local kind, ceiling, p1, p2 = ARGV[a], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  a = a + 6
  local used, reset
  if kind == 'r' then
    used, reset = read_rate(KEYS[k], KEYS[k + 1], now_us, p1, 0, ceiling)
    k = k + 2
  else
    if now_s < p1 or now_s >= p2 then return {-1, t[1], t[2]} end
    used = tonumber(redis.call('GET', KEYS[k]) or '0')
    reset = (p2 - now_s) * 1000000 - tonumber(t[2])
    k = k + 1
  end
  reply[#reply + 1] = used
  reply[#reply + 1] = reset
end
return reply
