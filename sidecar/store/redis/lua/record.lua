-- Counts usage records of one customer (SPEC §8), each on its own, in the order given: each is
-- counted once per its key, and an enforced one all or nothing, like a proxied request.
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
-- KEYS: per record, the keys of its request (lib.lua parse_request, with the usage hash last).
-- ARGV[1]: the number of records; then per record: key, at (unix seconds), enforce ('1' | '0'),
--   seconds, how many KEYS and how many ARGV its request takes, then the request's ARGV.
-- Returns {time_s, time_us, then per record: status, per limit: used, reset_us, over, per
--   credit: granted, balance, over}; status 1 counted, 0 duplicate, 2 refused (nothing written).
local t, now_s, frac_us = store_clock()
local reply = {t[1], t[2]}

local function seen_sets(usage_key, seconds)
  local bucket = math.floor(now_s / seconds)
  local prefix = string.sub(usage_key, 1, -2) .. 'rs:'
  return prefix .. bucket, prefix .. (bucket - 1), (bucket + 2) * seconds
end

local function is_duplicate(current, previous, key)
  return redis.call('SISMEMBER', current, key) == 1 or redis.call('SISMEMBER', previous, key) == 1
end

-- Reads each limit and credit; true when an enforced one has no room for the record.
local function refuses(req, at)
  local refused = false
  for _, l in ipairs(req.limits) do
    l.used = tonumber(redis.call('GET', l.key) or '0')
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

local function count(req, at)
  for _, l in ipairs(req.limits) do
    if l.amount > 0 and l.mode ~= 'a' then charge_limit(l, l.amount, 0) end
  end
  for _, c in ipairs(req.credits) do
    if c.amount > 0 then draw(c, req.limits, c.amount, 0, nil) end
  end
  record_usage(req.usage_key, at - at % req.interval, req.usage_from, req.usage_to)
end

local function answer(status, req)
  reply[#reply + 1] = status
  for _, l in ipairs(req.limits) do
    reply[#reply + 1] = l.used or 0
    reply[#reply + 1] = l.reset or 0
    reply[#reply + 1] = l.over and 1 or 0
  end
  for _, c in ipairs(req.credits) do
    reply[#reply + 1] = c.granted or 0
    reply[#reply + 1] = c.balance or 0
    reply[#reply + 1] = c.over and 1 or 0
  end
end

local k, a = 1, 2
for _ = 1, tonumber(ARGV[1]) do
  local key, at, enforce = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2] == '1'
  local seconds, n_keys, n_args = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local req = parse_request(k, a + 6, a + 5 + n_args)
  local current, previous, expires = seen_sets(req.usage_key, seconds)
  if is_duplicate(current, previous, key) then
    answer(0, req)
  elseif refuses(req, at) and enforce then
    answer(2, req)
  else
    count(req, at)
    redis.call('SADD', current, key)
    redis.call('EXPIREAT', current, expires)
    answer(1, req)
  end
  k, a = k + n_keys, a + 6 + n_args
end
return reply
