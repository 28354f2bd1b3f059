-- Charges what only the response told (tokens, bytes, time) to every limit and credit it applies
-- to, and records it for billing. Never refuses: the request was admitted while the balance was
-- above zero (or its reservation fitted), and the overshoot is bounded by what requests already
-- in flight use (SPEC section 5). When `hold_id` is given, that reservation is undone first, so
-- the real amount replaces it: settle; with no amounts, release.
--
-- KEYS, ARGV: the request of lib.lua's parse_request (the enforced/soft mode is ignored; the
-- ceilings of allowances decide how much of a prepaid amount they cover), then the call's name
-- (lib.lua call_name): the call leaves a record (remember_call), so that usage journaled for it
-- when its reply is lost is not merged twice. A charge is never undone: its record holds no steps.
-- Returns {1, time_s, time_us, notifications recorded (notify_lib.lua)}, or {-1, time_s, time_us}
-- when a calendar window given does not contain the store's time (nothing written; recompute and
-- call again), or {-2, ...} when the call came after its deadline (nothing written).
local t, now_s, frac_us, now_us = store_clock()
local req = parse_request(1, 1, #ARGV - 3)
local early = cannot_run(req, t, now_s, now_us)
if early then return early end
open_call_records(req)
if req.holds and req.hold ~= '' then release_hold(req.holds, req.hold_expiries, req.hold) end
release_expired_holds(req, math.floor(now_us / 1000))

for _, l in ipairs(req.limits) do read_limit(l, now_s, now_us, frac_us) end
for _, l in ipairs(req.limits) do
  if l.amount > 0 and l.mode ~= 'a' then charge_limit(l, l.amount, now_us) end
end
for _, c in ipairs(req.credits) do
  if c.amount > 0 then
    read_credit(c, now_s)
    draw(c, req.limits, c.amount, now_us, nil)
    drop_expired_grants(c, now_s)
  end
end
local notified = notify_crossings(req, now_s)
record_usage(req.usage_key, now_s - now_s % req.interval, req.usage_from, req.usage_to)
remember_call(req, {})
return {1, t[1], t[2], notified}
