-- Checks every limit and credit of one request and charges all of them, or none.
--
-- KEYS, ARGV: the request of lib.lua's parse_request, then the call's name (lib.lua call_name).
-- A limit's amount 0 is a response-time meter: admitted while used < ceiling, charged later. A
-- reserved amount is charged now and remembered as hold `hold_id`, which charge.lua undoes before
-- charging the real amount. An admitted call that wrote leaves a record of what undoes it
-- (remember_call).
-- Returns {status, time_s, time_us, then per limit: used, reset_us, over,
--          then per credit: granted, balance, over[, then notifications recorded]}
--   (the last only when the call watches thresholds: notify_lib.lua notify_crossings)
--   status 1 admitted (used and balance include this request), 0 refused (no limit, credit or
--   usage written; used and balance exclude it), -1 stale: a calendar window given does not
--   contain the store's time; recompute and call again; -2 past the deadline: nothing written.
-- Expired reservations of the customer are released first, even when the request is refused:
-- they hold units that no longer belong to anyone.
local t, now_s, frac_us, now_us = store_clock()
local req = parse_request(1, 1, #ARGV - 3)
local early = cannot_run(req, t, now_s, now_us)
if early then return early end
open_call_records(req)
release_expired_holds(req, math.floor(now_us / 1000))

local refused = false
for _, l in ipairs(req.limits) do
  read_limit(l, now_s, now_us, frac_us)
  l.over = l.used + needed(l.amount) > l.ceiling
  if l.over and l.mode == 'h' then refused = true end
end
for _, c in ipairs(req.credits) do
  read_credit(c, now_s)
  c.over = needed(c.amount) > allowance_room(c, req.limits) + c.balance
  if c.over and c.mode == 'h' then refused = true end
end

local notified = 0  -- crossings recorded (notify_lib.lua): the reply's last value when watched
local function answer(status)
  local reply = {status, t[1], t[2]}
  for _, l in ipairs(req.limits) do
    reply[#reply + 1] = l.used
    reply[#reply + 1] = l.reset
    reply[#reply + 1] = l.over and 1 or 0
  end
  for _, c in ipairs(req.credits) do
    reply[#reply + 1] = c.granted
    reply[#reply + 1] = c.balance
    reply[#reply + 1] = c.over and 1 or 0
  end
  if req.notify then reply[#reply + 1] = notified end
  return reply
end

if refused then return answer(0) end

-- What undoes this call (for void.lua), and, apart, what undoes its reservation.
local steps, held = {}, {}
for _, l in ipairs(req.limits) do
  if l.amount > 0 and l.mode ~= 'a' then
    local step = charge_limit(l, l.amount, now_us)
    if l.reserved then held[#held + 1] = step else steps[#steps + 1] = step end
  end
end
for _, c in ipairs(req.credits) do
  if c.amount > 0 then
    draw(c, req.limits, c.amount, now_us, c.reserved and held or steps)
    drop_expired_grants(c, now_s)
  end
end
notified = notify_crossings(req, now_s)
if keep_hold(req, held, math.floor(now_us / 1000)) then
  steps[#steps + 1] = {'h', req.holds, req.hold_expiries, req.hold}
end
record_usage(req.usage_key, now_s - now_s % req.interval, req.usage_from, req.usage_to, steps)
if #steps > 0 then remember_call(req, steps) end  -- a call that wrote nothing needs no undoing
return answer(1)
