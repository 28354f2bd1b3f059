-- Counts usage records (SPEC §8), each on its own, in the order given: each is counted once per
-- its key, and an enforced one all or nothing, like a proxied request. One call may carry the
-- records of several customers when the store is one server (store/redis/records.py); in a
-- cluster, of one slot.
--
-- A record happened at its own time `at`: it charges the calendar quotas of the windows `at`
-- falls in (the caller names them, as for a journal merge; never the store's current ones),
-- prepaid credit (grants in force at `at`, allowances first, as charge.lua draws), and the
-- billing window of `at` (close.lua gives a window already pushed a new revision: an amended
-- summary). Moving windows are never given: a rate limit meters the pace of requests, and a
-- record reports usage that already happened.
--
-- Deduplication: a counted record's key (a 12-byte digest of its source and id) is added to a
-- set per customer and bucket of `seconds` (events.dedupe_hours) of the store's clock,
-- "<tag>:rs:<bucket>" (store/keys.py, records_seen, built here from the usage key's name as
-- lib.lua open_call_records builds its list's), kept until the next bucket ends. A key in the
-- current or the previous bucket is a duplicate: one seen within `seconds` always is, one seen up
-- to twice that ago may be. A refused record is not remembered: sent again once there is room,
-- it counts.
--
-- Records of one call share shapes: a shape is what a record charges (one customer's calendar
-- quotas, credit and usage field), given once, and each record names its shape and the one
-- amount it adds to all of it.
-- KEYS: per shape: per limit its counter, per credit its grants left, grant expiries and
--   overdraft (lib.lua read_credit), then the usage hash, then the notification outbox when the
--   shape watches thresholds.
-- ARGV: seconds, the number of shapes, per shape: billing interval, the number of limits, per
--   limit: ceiling, mode ('h' enforced | 's' soft or shadow | 'a' allowance of a prepaid meter),
--   window end (s); the number of credits, per credit: mode ('h' | 's'), the number of
--   allowances, their indexes among the shape's limits; the usage field ("<meter>|<feature>", ''
--   for none) and its op ('+', 'max', 'min'), the number of thresholds watched and, when there
--   are any, the plan and the thresholds (ascending; notify_lib.lua notify_crossings records what
--   a record's charge crossed, once); then the number of records, per record: shape
--   (1-based), key, at (unix seconds), enforce ('1' | '0'), amount.
-- Returns {time_s, time_us, then per record: status, and for a refused one, per limit: used,
--   reset_us, over, per credit: granted, balance, over; then how many notifications the call
--   recorded}; status 1 counted, 0 duplicate, 2 refused (nothing written).
local t, now_s, frac_us = store_clock()
local reply = {t[1], t[2]}

-- One shape, read from KEYS[k..] and ARGV[a..] into lib.lua's limit and credit tables; the next
-- shape's k and a.
local function read_shape(k, a)
  local req = {interval = tonumber(ARGV[a]), limits = {}, credits = {}}
  a = a + 2
  for i = 1, tonumber(ARGV[a - 1]) do
    req.limits[i] = {kind = 'c', key = KEYS[k], ceiling = tonumber(ARGV[a]), mode = ARGV[a + 1], p2 = tonumber(ARGV[a + 2])}
    k, a = k + 1, a + 3
  end
  a = a + 1
  for i = 1, tonumber(ARGV[a - 1]) do
    local c = {mode = ARGV[a], allowances = {}, left_key = KEYS[k], expiry_key = KEYS[k + 1], overdraft_key = KEYS[k + 2]}
    for j = 1, tonumber(ARGV[a + 1]) do c.allowances[j] = tonumber(ARGV[a + 1 + j]) end
    req.credits[i] = c
    k, a = k + 3, a + 2 + #c.allowances
  end
  req.usage_key, req.field, req.op = KEYS[k], ARGV[a], ARGV[a + 1]
  local n = tonumber(ARGV[a + 2])  -- thresholds watched (notify_lib.lua), after the plan
  if n == 0 then return req, k + 1, a + 3 end
  req.notify, req.notify_end, req.notify_key = a + 4, a + 3 + n, KEYS[k + 1]
  for _, l in ipairs(req.limits) do l.p1 = tonumber(string.match(l.key, ':(%d+)$')) end  -- window start
  return req, k + 2, a + 4 + n
end

local function read_shapes()
  local shapes, k, a = {}, 1, 3
  for i = 1, tonumber(ARGV[2]) do shapes[i], k, a = read_shape(k, a) end
  return shapes, a
end

-- Reads each limit and credit with the record's amount; true when an enforced one has no room.
local function refuses(req, at)
  local refused = false
  for _, l in ipairs(req.limits) do
    l.used = tonumber(redis.call('GET', l.key) or '0')
    l.before = l.used
    l.reset = math.max(0, (l.p2 - now_s) * 1000000 - frac_us)
    l.over = l.used + needed(l.amount) > l.ceiling
    if l.over and l.mode == 'h' then refused = true end
  end
  for _, c in ipairs(req.credits) do
    read_credit(c, at)
    c.over = needed(c.amount) > allowance_room(c, req.limits) + c.balance
    if c.over and c.mode == 'h' then refused = true end
  end
  return refused
end

-- A calendar quota's counter, its expiry set when the counter is new (the window never moves).
local function add_to_quota(l, amount)
  local used = redis.call('INCRBY', l.key, string.format('%d', amount))
  if used == amount then
    redis.call('EXPIREAT', l.key, l.p2 + 86400)
  end
  l.before, l.used = used - amount, used
end

-- Adds the amount to the shape's usage field of the billing window (ops "+", "max", "min").
local function add_usage(req, window, amount)
  if req.field == '' then return end
  local field, op, value = window .. '|' .. req.field, req.op, string.format('%d', amount)
  if op == '+' then
    redis.call('HINCRBY', req.usage_key, field, value)
  else
    local current = tonumber(redis.call('HGET', req.usage_key, field))
    if current == nil or (op == 'max' and amount > current) or (op == 'min' and amount < current) then
      redis.call('HSET', req.usage_key, field, value)
    end
  end
end

-- Counts one record; 2 when it is enforced and refused (having written nothing), else 1.
local function count(req, at, enforce, amount)
  for _, l in ipairs(req.limits) do l.amount, l.before = amount, nil end
  for _, c in ipairs(req.credits) do c.amount, c.before = amount, nil end
  if enforce or #req.credits > 0 then
    if refuses(req, at) and enforce then return 2 end
    for _, l in ipairs(req.limits) do
      if amount > 0 and l.mode ~= 'a' then charge_limit(l, amount, 0) end
    end
    for _, c in ipairs(req.credits) do
      if amount > 0 then draw(c, req.limits, amount, 0, nil) end
    end
  elseif amount > 0 then
    for _, l in ipairs(req.limits) do add_to_quota(l, amount) end
  end
  notify_crossings(req, at)
  add_usage(req, at - at % req.interval, amount)
  return 1
end

local function answer_refused(req)
  reply[#reply + 1] = 2
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
end

local shapes, a = read_shapes()
local seconds = tonumber(ARGV[1])
local bucket = math.floor(now_s / seconds)
local remembered = {}  -- the sets this call added to, each given its expiry once at the end
for _, req in ipairs(shapes) do
  local prefix = string.sub(req.usage_key, 1, -2) .. 'rs:'
  req.current, req.previous = prefix .. bucket, prefix .. (bucket - 1)
end
for _ = 1, tonumber(ARGV[a]) do
  local req, key = shapes[tonumber(ARGV[a + 1])], ARGV[a + 2]
  local at, enforce, amount = tonumber(ARGV[a + 3]), ARGV[a + 4] == '1', tonumber(ARGV[a + 5])
  a = a + 5
  if redis.call('SISMEMBER', req.current, key) == 1 or redis.call('SISMEMBER', req.previous, key) == 1 then
    reply[#reply + 1] = 0
  elseif count(req, at, enforce, amount) == 2 then
    answer_refused(req)
  else
    redis.call('SADD', req.current, key)
    remembered[req.current] = true
    reply[#reply + 1] = 1
  end
end
for set in pairs(remembered) do redis.call('EXPIREAT', set, (bucket + 2) * seconds) end
reply[#reply + 1] = crossed  -- notifications recorded (notify_lib.lua), read by store.py
return reply
