-- Threshold notifications, shared by the metering scripts after lib.lua (calls.py load_script puts
-- both in front of each): lib.lua's read_notify reads a call's notification block, read_limit and
-- read_credit note each value before the call's charges, and notify_crossings, called once the
-- call has charged, records what crossed.
--
-- Threshold notifications (SPEC §9; store/notifications.py). A call that watches thresholds
-- compares each limit's used, and each credit's balance, before and after its charges: a crossing
-- is recorded in the customer's notification outbox under its name, "<type>|<name>|<window>|<t>",
-- once: a marker key for that name ("<tag>:nm:<crossing>") is set in the same atomic step, so a
-- later call (a reservation settled, an undo charged again) or another replica never records it
-- again. The window of a moving window is the period-long span of the epoch it crossed in; of a
-- credit, a digest of the grants in force (a new grant starts a new one).
local RECENT_KEPT = 20  -- notifications.RECENT_KEPT
local RECENT_SECONDS = 35 * 86400
local CREDIT_MARKER_SECONDS = 90 * 86400
local crossed = 0  -- crossings this call recorded (a script runs this file anew on every call)

local function record_crossing(req, crossing, record, expire_at)
  local base = string.sub(req.notify_key, 1, -3)  -- "<tag>:" of "<tag>:no"
  local marker = base .. 'nm:' .. crossing
  if not redis.call('SET', marker, '1', 'NX') then return end
  redis.call('EXPIREAT', marker, expire_at)
  local text = cjson.encode(record)
  redis.call('HSET', req.notify_key, crossing, text)
  redis.call('LPUSH', base .. 'nr', crossing .. ' ' .. text)
  redis.call('LTRIM', base .. 'nr', 0, RECENT_KEPT - 1)
  redis.call('EXPIRE', base .. 'nr', RECENT_SECONDS)
  crossed = crossed + 1
end

-- A limit's name, from its key: "<tag>:q:<name>:<window>" or "<tag>:rl:<name>" (store/keys.py).
local function limit_name(key)
  local rest = string.sub(key, string.find(key, '}:', 1, true) + 2)
  local name = string.sub(rest, string.find(rest, ':', 1, true) + 1)
  local colon = string.find(name, ':', 1, true)
  return colon and string.sub(name, 1, colon - 1) or name
end

-- Records each threshold a limit's charge took its usage across.
local function notify_limit(req, l, now_s)
  local ws, we, keep = l.p1, l.p2, 86400
  if l.kind == 'r' then
    local span = math.floor(l.p1 / 1000000)
    ws, keep = now_s - now_s % span, 60
    we = ws + span
  end
  local name, plan = limit_name(l.key), ARGV[req.notify - 1]
  for a = req.notify, req.notify_end do
    local t = tonumber(ARGV[a])
    if l.before * 100 < t * l.ceiling and l.used * 100 >= t * l.ceiling then
      record_crossing(req, 'limit.threshold|' .. name .. '|' .. ws .. '|' .. t, {type = 'limit.threshold',
        name = name, plan = plan, threshold = t, used = l.used, limit = l.ceiling, ws = ws, we = we,
        at = now_s}, we + keep)
    end
  end
end

local function credit_crossing(req, c, kind, t, now_s)
  local meter = string.sub(c.left_key, string.find(c.left_key, '}:', 1, true) + 5)  -- "<tag>:cr:<meter>"
  local grants = string.sub(redis.sha1hex(table.concat(c.ids, ',')), 1, 12)
  record_crossing(req, kind .. '|' .. meter .. '|' .. grants .. '|' .. t, {type = kind, name = meter,
    plan = ARGV[req.notify - 1], threshold = t, used = c.granted - c.balance, limit = c.granted, at = now_s},
    now_s + CREDIT_MARKER_SECONDS)
end

-- Records credit.low at each threshold (below 100) of the credit granted that drawing took it
-- across, and credit.exhausted when it took the balance to zero.
local function notify_credit(req, c, now_s)
  local granted = c.granted
  local before, used = granted - c.before, granted - c.balance
  for a = req.notify, req.notify_end do
    local t = tonumber(ARGV[a])
    if t < 100 and before * 100 < t * granted and used * 100 >= t * granted then
      credit_crossing(req, c, 'credit.low', t, now_s)
    end
  end
  if c.before > 0 and c.balance <= 0 then credit_crossing(req, c, 'credit.exhausted', 100, now_s) end
end

-- Records every threshold this call's charges crossed (read_limit and read_credit noted the values
-- before them); how many were recorded. A limit charged but still below the lowest threshold, the
-- usual case, costs two comparisons.
local function notify_crossings(req, now_s)
  if not req.notify then return 0 end
  local lowest, limits, credits = tonumber(ARGV[req.notify]), req.limits, req.credits
  for i = 1, #limits do
    local l = limits[i]
    if l.before and l.used > l.before and l.used * 100 >= lowest * l.ceiling then notify_limit(req, l, now_s) end
  end
  for i = 1, #credits do
    local c = credits[i]
    local granted = c.granted
    if c.before and c.balance < c.before and (c.balance <= 0 or (granted - c.balance) * 100 >= lowest * granted) then
      notify_credit(req, c, now_s)
    end
  end
  return crossed
end
