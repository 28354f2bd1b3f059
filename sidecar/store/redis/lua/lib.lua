-- Shared by every script (prepended when the script is loaded). All keys of one call share the
-- customer's hash tag, so each script touches one cluster slot.
--
-- A rate limit is a moving window kept as a log: a list of "<microseconds>:<amount>" entries,
-- newest first, plus a running total of the amounts still in the list. An entry counts while
-- its time is inside (now - window, now].
--
-- A calendar quota is one counter per window, named by the window's start.

local function parse_entry(entry)
  local sep = string.find(entry, ':', 1, true)
  return tonumber(string.sub(entry, 1, sep - 1)), tonumber(string.sub(entry, sep + 1))
end

-- Log entries read per command while looking for the oldest live one: one command covers the
-- entries a busy window expires between two requests.
local TAIL = 3

-- Units in the moving window, how many log entries have expired, and the oldest live entry's time
-- (nil when none is live); reads only. The tail (the oldest entries) is read TAIL at a time.
local function rate_used(log_key, total_key, horizon)
  local total = tonumber(redis.call('GET', total_key) or '0')
  local expired, expired_entries = 0, 0
  while true do
    local stop = -1 - expired_entries
    local tail = redis.call('LRANGE', log_key, stop - TAIL + 1, stop)  -- oldest last
    for i = #tail, 1, -1 do
      local ts, amount = parse_entry(tail[i])
      if ts > horizon then return total - expired, expired_entries, ts end
      expired = expired + amount
      expired_entries = expired_entries + 1
    end
    if #tail < TAIL then return total - expired, expired_entries, nil end
  end
end

-- Microseconds until `needed` more units have left the window (the oldest leave first).
local function rate_wait(log_key, first_live, horizon, needed)
  local freed, index = 0, first_live
  while true do
    local entry = redis.call('LINDEX', log_key, -1 - index)
    if not entry then return 0 end
    local ts, amount = parse_entry(entry)
    freed = freed + amount
    if freed >= needed then return ts - horizon end
    index = index + 1
  end
end

-- Units a request needs free to pass: its amount, or one for a meter charged at response time
-- (amount 0), which is admitted while its balance is above zero.
local function needed(amount)
  return math.max(amount, 1)
end

-- Reads one limit: used, reset in microseconds, expired entries; `amount` is what the request adds.
local function read_rate(log_key, total_key, now_us, window_us, amount, ceiling)
  local horizon = now_us - window_us
  local used, expired_entries, oldest_live = rate_used(log_key, total_key, horizon)
  local need = needed(amount)
  local reset
  if need > ceiling then
    reset = window_us
  elseif used + need > ceiling then
    reset = rate_wait(log_key, expired_entries, horizon, used + need - ceiling)
  elseif oldest_live then
    reset = oldest_live - horizon  -- when the oldest live entry leaves, a unit is free again
  else
    reset = window_us
  end
  return used, reset, expired_entries
end

-- Adds `amount` to a moving-window log, dropping the `expired_entries` that left the window.
local function charge_rate(log_key, total_key, now_us, window_us, amount, used, expired_entries)
  if expired_entries > 0 then redis.call('LTRIM', log_key, 0, -1 - expired_entries) end
  local entry = string.format('%d:%d', now_us, amount)
  redis.call('LPUSH', log_key, entry)
  local ttl_ms = math.floor(window_us / 1000) + 1000
  redis.call('SET', total_key, string.format('%d', used + amount), 'PX', ttl_ms)
  redis.call('PEXPIRE', log_key, ttl_ms)
  return entry
end

-- Adds `amount` to a calendar window's counter, kept a day past the window's end. The expiry is
-- set when the counter starts (every writer of a counter sets it then), not on every charge.
local function charge_calendar(key, window_end, amount)
  if redis.call('INCRBY', key, string.format('%d', amount)) == amount then
    redis.call('EXPIREAT', key, window_end + 86400)
  end
end

-- Records ARGV[first..last] usage triples (field suffix, op, amount) in the billing window's
-- fields, appending to `steps` (when given) what undoes each write. A unique meter's value is
-- kept as its own field, "u|<window>|<meter>|<feature>|<value>", holding how many requests saw it
-- (so one of them can be undone); close.lua counts the distinct ones.
local function record_usage(usage_key, window, first, last, steps)
  for a = first, last, 3 do
    local field, op, amount = window .. '|' .. ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
    if op == 'uniq' then
      redis.call('HINCRBY', usage_key, 'u|' .. field, 1)
      if steps then steps[#steps + 1] = {'x', usage_key, 'u|' .. field} end
    elseif op == '+' then
      redis.call('HINCRBY', usage_key, field, string.format('%d', amount))
      if steps then steps[#steps + 1] = {'u', usage_key, field, string.format('%d', amount)} end
    else
      local before = redis.call('HGET', usage_key, field)
      local current = tonumber(before)
      if current == nil or (op == 'max' and amount > current) or (op == 'min' and amount < current) then
        local value = string.format('%d', amount)
        redis.call('HSET', usage_key, field, value)
        if steps then steps[#steps + 1] = {'m', usage_key, field, value, before or ''} end
      end
    end
  end
end

-- The request every metering script is given (see store/redis.py, _arguments), read from
-- KEYS[k..] and ARGV[a..] (both 1 unless a script puts its own values first):
-- ARGV: billing_interval, hold_id ('' for none), hold_ttl_ms, flags (1 when hold keys are given,
--       plus 2 when a notification block is: '0' to '3'; a release before notifications sent only
--       '1' or '0', which read as they did), n_limits,
--       deadline_us (store clock; 0 for none: after it, check_and_meter and charge write nothing),
--       per limit 6 values: kind ('r' rate | 'c' calendar), amount, ceiling,
--         mode (first letter 'h' enforced | 's' soft or shadow | 'a' allowance of a prepaid meter;
--               a second letter 'r' when the amount is a reservation),
--         rate: window_us, 0   calendar: window_start_s, window_end_s,
--       n_credits, per credit: amount, mode ('h' | 's', then 'r' when reserved), n_allowances,
--         the allowances' indexes (1-based) among the limits,
--       then usage triples (field suffix "<meter>|<feature>", op, amount), then, when the flags
--       say so, the notification block (read_notify), ending at ARGV[last].
-- KEYS: holds, hold expiries (when has_hold_keys); per limit rate: <log>, <total>, calendar: <counter>;
--       per credit: <grants left>, <grant expiries>, <overdraft>; then the usage hash (if any), then
--       the notification outbox (when the flags say so).

-- The notification block, the request's last ARGV: plan, the thresholds (percent, ascending),
-- their count. Appended (store.py script_arguments), so a request of a release before it reads as
-- it did. Only where it is is noted (req.notify: the lowest threshold's index, req.notify_end: the
-- highest's): a call that crosses nothing reads one threshold and allocates nothing.
local function read_notify(req, key)
  local last = req.usage_to
  local n = tonumber(ARGV[last])
  req.notify, req.notify_end, req.notify_key = last - n, last - 1, key
  req.usage_to = last - n - 2
end

local function parse_request(k, a, last)
  k, a = k or 1, a or 1
  -- Every field a call sets later is named here (false until then), so the table is allocated
  -- at its final size once instead of growing (rehashing) as the script fills it in.
  local req = {interval = tonumber(ARGV[a]), hold = ARGV[a + 1], ttl = tonumber(ARGV[a + 2]), limits = {}, credits = {},
    deadline_us = false, holds = false, hold_expiries = false, usage_key = false, usage_from = false,
    usage_to = false, calls_key = false}
  local flags = tonumber(ARGV[a + 3])
  local has_holds, notifies = flags % 2 == 1, flags >= 2
  local n_limits = tonumber(ARGV[a + 4])
  req.deadline_us = tonumber(ARGV[a + 5])
  a = a + 6
  if has_holds then
    req.holds, req.hold_expiries = KEYS[k], KEYS[k + 1]
    k = k + 2
  end
  for i = 1, n_limits do
    local mode = ARGV[a + 3]
    local l = {kind = ARGV[a], amount = tonumber(ARGV[a + 1]), ceiling = tonumber(ARGV[a + 2]),
      mode = string.sub(mode, 1, 1), reserved = string.sub(mode, 2, 2) == 'r',
      p1 = tonumber(ARGV[a + 4]), p2 = tonumber(ARGV[a + 5]), key = KEYS[k],
      total = false, used = false, reset = false, expired = false, before = false, over = false}
    if l.kind == 'r' then
      l.total = KEYS[k + 1]
      k = k + 2
    else
      k = k + 1
    end
    req.limits[i] = l
    a = a + 6
  end
  local n_credits = tonumber(ARGV[a])
  a = a + 1
  for i = 1, n_credits do
    local mode = ARGV[a + 1]
    local c = {amount = tonumber(ARGV[a]), mode = string.sub(mode, 1, 1), reserved = string.sub(mode, 2, 2) == 'r',
      allowances = {}, left_key = KEYS[k], expiry_key = KEYS[k + 1], overdraft_key = KEYS[k + 2]}
    local n_allowances = tonumber(ARGV[a + 2])
    for j = 1, n_allowances do c.allowances[j] = tonumber(ARGV[a + 2 + j]) end
    req.credits[i] = c
    a = a + 3 + n_allowances
    k = k + 3
  end
  req.usage_key, req.usage_from, req.usage_to = KEYS[k], a, last or #ARGV
  if notifies then read_notify(req, KEYS[k + 1]) end
  return req
end

-- True when the caller has given up on this call (see store/redis.py, _deadline).
local function past_deadline(req, now_us)
  return req.deadline_us > 0 and now_us > req.deadline_us
end

-- True when a calendar window given does not contain the store's time.
local function stale(req, now_s)
  for _, l in ipairs(req.limits) do
    if l.kind == 'c' and (now_s < l.p1 or now_s >= l.p2) then return true end
  end
  return false
end

-- The store's clock: TIME's reply (echoed to the caller), whole seconds, microseconds within the
-- second, and microseconds since the epoch.
local function store_clock()
  local t = redis.call('TIME')
  local now_s, frac_us = tonumber(t[1]), tonumber(t[2])
  return t, now_s, frac_us, now_s * 1000000 + frac_us
end

-- The reply of a script that must write nothing: {-2, ...} past the caller's deadline, {-1, ...}
-- when a calendar window is stale; nil when the script may go on.
local function cannot_run(req, t, now_s, now_us)
  if past_deadline(req, now_us) then return {-2, t[1], t[2]} end
  if stale(req, now_s) then return {-1, t[1], t[2]} end
  return nil
end

-- Fills in l.used and l.reset (and l.expired for a rate limit); reads only.
local function read_limit(l, now_s, now_us, frac_us)
  if l.kind == 'r' then
    l.used, l.reset, l.expired = read_rate(l.key, l.total, now_us, l.p1, l.amount, l.ceiling)
  else
    l.used = tonumber(redis.call('GET', l.key) or '0')
    l.reset = (l.p2 - now_s) * 1000000 - frac_us
  end
  l.before = l.used
end

-- Adds `amount` to one limit; returns what undoes it, for a reservation.
local function charge_limit(l, amount, now_us)
  if l.kind == 'r' then
    local entry = charge_rate(l.key, l.total, now_us, l.p1, amount, l.used, l.expired)
    l.used, l.expired = l.used + amount, 0
    return {'r', l.key, l.total, entry, string.format('%d', amount)}
  end
  charge_calendar(l.key, l.p2, amount)
  l.used = l.used + amount
  return {'c', l.key, string.format('%d', amount)}
end

-- Prepaid credit of one (customer, meter): a hash of each grant's units left (field <id>) and
-- granted (field a:<id>), a sorted set of grant ids scored by expiry (unix seconds; a grant counts
-- while now < expiry), and an overdraft: units used beyond every grant, which the next grant pays
-- off first. Grants are drawn earliest expiry first (ties: by id).

-- The grants in force in drawing order, what each has left, the units granted, and the balance.
local function read_credit(c, now_s)
  local ids = redis.call('ZRANGEBYSCORE', c.expiry_key, '(' .. now_s, '+inf')
  local left, granted, balance = {}, 0, 0
  for i, id in ipairs(ids) do
    local values = redis.call('HMGET', c.left_key, id, 'a:' .. id)
    left[i] = tonumber(values[1] or '0')
    granted = granted + tonumber(values[2] or '0')
    balance = balance + left[i]
  end
  c.ids, c.left, c.granted = ids, left, granted
  c.balance = balance - tonumber(redis.call('GET', c.overdraft_key) or '0')
  c.before = c.balance
end

-- Forgets grants that have expired (their units no longer count).
local function drop_expired_grants(c, now_s)
  local gone = redis.call('ZRANGEBYSCORE', c.expiry_key, '-inf', now_s)
  for _, id in ipairs(gone) do redis.call('HDEL', c.left_key, id, 'a:' .. id) end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', c.expiry_key, '-inf', now_s) end
end

-- Units the period allowances of a credit still cover: the least any of them has left.
local function allowance_room(c, limits)
  local room = nil
  for _, index in ipairs(c.allowances) do
    local l = limits[index]
    local left = math.max(0, l.ceiling - l.used)
    if room == nil or left < room then room = left end
  end
  return room or 0
end

-- Charges `amount` of a credit's meter: the allowances first, then the grants in order, then the
-- overdraft. Appends what undoes it to `steps` when given.
local function draw(c, limits, amount, now_us, steps)
  local covered = math.min(amount, allowance_room(c, limits))
  if covered > 0 then
    for _, index in ipairs(c.allowances) do
      local step = charge_limit(limits[index], covered, now_us)
      if steps then steps[#steps + 1] = step end
    end
  end
  local rest = amount - covered
  for i, id in ipairs(c.ids) do
    if rest <= 0 then break end
    local take = math.min(c.left[i], rest)
    if take > 0 then
      redis.call('HINCRBY', c.left_key, id, string.format('%d', -take))
      c.left[i], rest = c.left[i] - take, rest - take
      if steps then steps[#steps + 1] = {'g', c.left_key, c.expiry_key, id, string.format('%d', take)} end
    end
  end
  if rest > 0 then
    redis.call('INCRBY', c.overdraft_key, string.format('%d', rest))
    if steps then steps[#steps + 1] = {'o', c.overdraft_key, string.format('%d', rest)} end
  end
  c.balance = c.balance - (amount - covered)
end

-- Undoes the writes a list of steps describes (a reservation's, or a call's: remember_call):
--   {'c', counter, amount}                  a calendar quota charge
--   {'r', log, total, entry, amount}        a moving-window entry, if it is still in the window
--   {'g', grant units left, expiries, id, amount}   units drawn from a grant still in force
--   {'o', overdraft, amount}                an overdraft
--   {'h', holds, hold expiries, id}         a reservation, if it is still held
--   {'u', usage, field, amount}             billing usage added, if its window is not closed yet
--   {'x', usage, field}                     one sighting of a unique meter's value
--   {'m', usage, field, value, previous}    a max/min set to value, if no later request moved it
-- Every key carries the customer's hash tag, like the keys of the call that undoes them.
local release_hold
local function undo(steps)
  for _, step in ipairs(steps) do
    local kind = step[1]
    if kind == 'c' then
      if redis.call('EXISTS', step[2]) == 1 then redis.call('DECRBY', step[2], step[3]) end
    elseif kind == 'r' then
      if redis.call('LREM', step[2], 1, step[4]) == 1 then redis.call('DECRBY', step[3], step[5]) end
    elseif kind == 'g' then
      if redis.call('ZSCORE', step[3], step[4]) then redis.call('HINCRBY', step[2], step[4], step[5]) end
    elseif kind == 'o' then
      local owed = tonumber(redis.call('GET', step[2]) or '0')
      redis.call('SET', step[2], string.format('%d', math.max(0, owed - tonumber(step[3]))))
    elseif kind == 'h' then
      release_hold(step[2], step[3], step[4])
    elseif kind == 'u' then
      local left = tonumber(redis.call('HGET', step[2], step[3]) or '0') - tonumber(step[4])
      if left > 0 then
        redis.call('HSET', step[2], step[3], string.format('%d', left))
      elseif left == 0 then
        redis.call('HDEL', step[2], step[3])
      end  -- less than the amount: close.lua moved the window to the outbox (void.lua checks first)
    elseif kind == 'x' then
      if redis.call('HINCRBY', step[2], step[3], -1) <= 0 then redis.call('HDEL', step[2], step[3]) end
    elseif kind == 'm' then
      if redis.call('HGET', step[2], step[3]) == step[4] then
        if step[5] == '' then redis.call('HDEL', step[2], step[3]) else redis.call('HSET', step[2], step[3], step[5]) end
      end
    end
  end
end

-- Undoes what one reservation holds, if it is still held (settled, released or expired once only).
release_hold = function(holds, hold_expiries, id)
  local record = redis.call('HGET', holds, id)
  if not record then return end
  redis.call('HDEL', holds, id)
  redis.call('ZREM', hold_expiries, id)
  undo(cjson.decode(record))
end

-- Releases reservations whose replica did not settle them in time (it crashed, or lost the store).
local function release_expired_holds(req, now_ms)
  if not req.holds then return end
  local expired = redis.call('ZRANGEBYSCORE', req.hold_expiries, '-inf', now_ms, 'LIMIT', 0, 32)
  for _, id in ipairs(expired) do release_hold(req.holds, req.hold_expiries, id) end
end

-- Remembers what a reservation holds, to be undone by settle, release or expiry; true when kept.
local function keep_hold(req, undo_steps, now_ms)
  if req.hold == '' or not req.holds or #undo_steps == 0 then return false end
  redis.call('HSET', req.holds, req.hold, cjson.encode(undo_steps))
  redis.call('ZADD', req.hold_expiries, now_ms + req.ttl, req.hold)
  return true
end

-- A metering call's name, which the batcher appends to its ARGV as it writes the call to a
-- connection (store/batching.py): the connection's token, the call's sequence number on it, and
-- the sequence number of the last reply the sidecar had read on it by then.
local function call_name()
  local n = #ARGV
  return ARGV[n - 2], tonumber(ARGV[n - 1]), tonumber(ARGV[n])
end

-- Finds the list of the customer's call records of this call's connection (store/keys.py,
-- call_records: "<tag>:calls:<token>", next to the usage hash "<tag>:u") and reads it before the
-- script writes anything: the name is known only as the call is written, so the key cannot be
-- declared, and in a cluster slot that is migrating a list already moved must fail the call
-- before its first write, not after.
local function open_call_records(req)
  local token = call_name()
  req.calls_key = string.sub(req.usage_key, 1, -2) .. 'calls:' .. token
  redis.call('EXISTS', req.calls_key)
end

-- Seconds a list of call records lives after its last push. A lost reply is looked up when the
-- journal merges, about a second after the store answers again (or when a sidecar that died
-- restarts), so an hour covers the outages worth riding out, while the list of a connection
-- that was replaced (after a lost connection or a late reply) costs about 400 bytes per customer
-- it served for that long (BENCHMARKS.md).
local CALL_RECORD_TTL = 3600

-- Records that this call wrote, with the steps that undo it, in the list of the customer's calls
-- of this connection, and drops the records of earlier calls whose replies the sidecar has read:
-- their outcome is known. What stays is the calls in flight, the last one, and a call whose reply
-- was lost with its connection (or came too late), which the journal finds later: it skips the
-- usage it kept for that call (store_failure: open), or undoes the call (void.lua, closed). The
-- new record is pushed before the old ones are dropped, so the list is never emptied.
local function remember_call(req, steps)
  local _, seq, answered = call_name()
  local key = req.calls_key
  local length = redis.call('RPUSH', key, string.format('%d ', seq) .. cjson.encode(steps))
  redis.call('EXPIRE', key, CALL_RECORD_TTL)
  if length == 1 then return end
  -- The list is in call order. When the record written just before this one is answered, every
  -- earlier one is too, and one LTRIM drops them all (the usual case); else the answered ones
  -- at the head go one by one.
  if tonumber(string.match(redis.call('LINDEX', key, -2), '^%d+')) <= answered then
    redis.call('LTRIM', key, -1, -1)
    return
  end
  while true do
    local oldest = redis.call('LINDEX', key, 0)
    if not oldest or tonumber(string.match(oldest, '^%d+')) > answered then break end
    redis.call('LPOP', key)
  end
end

-- The record of call `seq` in a list of call records, and its text; nil when that call wrote
-- nothing (it was refused, came after its deadline, or never ran).
local function find_call(key, seq)
  local prefix = string.format('%d ', seq)
  for _, record in ipairs(redis.call('LRANGE', key, 0, -1)) do
    if string.sub(record, 1, #prefix) == prefix then return record end
  end
  return nil
end

-- Takes the record of call `seq` out of a list of call records: the steps that undo the call, or
-- nil when that call wrote nothing.
local function take_call(key, seq)
  local record = find_call(key, seq)
  if not record then return nil end
  redis.call('LREM', key, 1, record)
  return cjson.decode(string.sub(record, #string.format('%d ', seq) + 1))
end
