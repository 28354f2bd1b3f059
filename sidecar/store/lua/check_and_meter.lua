-- Checks every limit of one request and charges all of them, or none.
--
-- KEYS: for each limit, rate: <log>, <total>; calendar: <counter>. Then the usage hash.
-- ARGV: billing_interval, n_limits, then per limit 6 values:
--         kind ('r' rate | 'c' calendar), amount, ceiling, mode ('h' enforced | 's' soft or shadow),
--         (amount 0: a response-time meter, admitted while used < ceiling, charged later)
--         rate: window_us, 0   calendar: window_start_s, window_end_s
--       then per usage entry 3 values: field suffix "<meter>|<feature>", op ('+' | 'max' | 'min'), amount
-- Returns {status, time_s, time_us, then per limit: used, reset_us, over}
--   status 1 admitted (used includes this request), 0 refused (nothing written; used excludes it),
--   -1 stale: a calendar window given does not contain the store's time; recompute and call again.
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_us = now_s * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[2])
local reply = {1, t[1], t[2]}
local pending = {}
local refused = false
local k, a = 1, 3

for i = 1, n do
  local kind, amount, ceiling = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local hard, p1, p2 = ARGV[a + 3] == 'h', tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  a = a + 6
  local used, reset, op
  if kind == 'r' then
    local expired_entries
    used, reset, expired_entries = read_rate(KEYS[k], KEYS[k + 1], now_us, p1, amount, ceiling)
    op = {'r', KEYS[k], KEYS[k + 1], expired_entries, p1}
    k = k + 2
  else
    if now_s < p1 or now_s >= p2 then return {-1, t[1], t[2]} end
    used = tonumber(redis.call('GET', KEYS[k]) or '0')
    reset = (p2 - now_s) * 1000000 - tonumber(t[2])
    op = {'c', KEYS[k], p2}
    k = k + 1
  end
  local over = used + needed(amount) > ceiling
  if over and hard then refused = true end
  pending[i] = {op, amount, used}
  reply[#reply + 1] = used
  reply[#reply + 1] = reset
  reply[#reply + 1] = over and 1 or 0
end

if refused then
  reply[1] = 0
  return reply
end

for i = 1, n do
  local op, amount, used = pending[i][1], pending[i][2], pending[i][3]
  if amount > 0 and op[1] == 'r' then
    charge_rate(op[2], op[3], now_us, op[5], amount, used, op[4])
  elseif amount > 0 then
    charge_calendar(op[2], op[3], amount)
  end
  reply[3 + (i - 1) * 3 + 1] = used + amount
end

record_usage(KEYS[k], now_s - now_s % tonumber(ARGV[1]), a)
return reply
