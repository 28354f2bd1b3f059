-- Merges one entry of a sidecar's local journal: usage it admitted while the store was
-- unreachable (store_failure: open), or a response-time charge it could not send. Once per entry
-- (a marker key remembers it), at the time the usage happened.
--
-- KEYS[1]: the entry's marker; when the entry names a call, KEYS[2]: that sidecar's list of the
-- customer's call records (store/keys.py, call_records); then the request of lib.lua's
-- parse_request.
-- ARGV[1]: when the usage happened (unix seconds), ARGV[2]: seconds to keep the marker,
-- ARGV[3..5]: the metering call the entry stands for, when it was sent and its reply never came
--   (its sidecar's token, its number, its deadline in store microseconds; '', 0, 0 for none);
-- then the request.
-- Calendar quotas are charged in the windows given (those of that time) and usage lands in that
-- time's billing window (close.lua gives a window already pushed a new revision). Rate limits are
-- skipped: their moving windows have passed. Credit is drawn as charge.lua draws it.
-- Returns 1 merged, 0 merged before, 2 not merged: the call it stands for ran in the store after
-- all (its record says so), -1 too early: that call's deadline has not passed, so it may still
-- run; nothing written, try again later.
local named, seq, deadline_us = ARGV[3] ~= '', tonumber(ARGV[4]), tonumber(ARGV[5])
if named then
  local _, _, _, now_us = store_clock()
  if now_us <= deadline_us then return -1 end
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
if named and take_call(KEYS[2], seq) then return 2 end
local at = tonumber(ARGV[1])
local req = parse_request(named and 3 or 2, 6)
for _, l in ipairs(req.limits) do
  if l.kind == 'c' then
    l.used = tonumber(redis.call('GET', l.key) or '0')
    l.before = l.used
  end
end
for _, l in ipairs(req.limits) do
  if l.kind == 'c' and l.amount > 0 and l.mode ~= 'a' then
    charge_calendar(l.key, l.p2, l.amount)
    l.used = l.used + l.amount
  end
end
for _, c in ipairs(req.credits) do
  if c.amount > 0 then
    read_credit(c, at)
    draw(c, req.limits, c.amount, 0, nil)
  end
end
notify_crossings(req, at)  -- the store learns of them from the merge (store.py, _replay_once)
record_usage(req.usage_key, at - at % req.interval, req.usage_from, req.usage_to)
return 1
