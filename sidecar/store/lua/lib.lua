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

-- Units in the moving window and how many log entries have expired; reads only.
local function rate_used(log_key, total_key, horizon)
  local total = tonumber(redis.call('GET', total_key) or '0')
  local expired, expired_entries = 0, 0
  while true do
    local entry = redis.call('LINDEX', log_key, -1 - expired_entries)
    if not entry then break end
    local ts, amount = parse_entry(entry)
    if ts > horizon then break end
    expired = expired + amount
    expired_entries = expired_entries + 1
  end
  return total - expired, expired_entries
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
  local used, expired_entries = rate_used(log_key, total_key, horizon)
  local need = needed(amount)
  local reset
  if need > ceiling then
    reset = window_us
  elseif used + need > ceiling then
    reset = rate_wait(log_key, expired_entries, horizon, used + need - ceiling)
  else
    reset = rate_wait(log_key, expired_entries, horizon, 1)
    if reset == 0 then reset = window_us end
  end
  return used, reset, expired_entries
end

-- Adds `amount` to a moving-window log, dropping the `expired_entries` that left the window.
local function charge_rate(log_key, total_key, now_us, window_us, amount, used, expired_entries)
  if expired_entries > 0 then redis.call('LTRIM', log_key, 0, -1 - expired_entries) end
  redis.call('LPUSH', log_key, string.format('%d:%d', now_us, amount))
  redis.call('SET', total_key, string.format('%d', used + amount))
  local ttl_ms = math.floor(window_us / 1000) + 1000
  redis.call('PEXPIRE', log_key, ttl_ms)
  redis.call('PEXPIRE', total_key, ttl_ms)
end

-- Adds `amount` to a calendar window's counter, kept a day past the window's end.
local function charge_calendar(key, window_end, amount)
  redis.call('INCRBY', key, string.format('%d', amount))
  redis.call('EXPIREAT', key, window_end + 86400)
end

-- Records ARGV[first..] usage triples (field suffix, op, amount) in the billing window's fields.
-- A unique meter's value is kept as its own field, "u|<window>|<meter>|<feature>|<value>", and
-- close.lua counts the distinct ones.
local function record_usage(usage_key, window, first)
  for a = first, #ARGV, 3 do
    local field, op, amount = window .. '|' .. ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
    if op == 'uniq' then
      redis.call('HSET', usage_key, 'u|' .. field, 1)
    elseif op == '+' then
      redis.call('HINCRBY', usage_key, field, string.format('%d', amount))
    else
      local current = tonumber(redis.call('HGET', usage_key, field))
      if current == nil or (op == 'max' and amount > current) or (op == 'min' and amount < current) then
        redis.call('HSET', usage_key, field, string.format('%d', amount))
      end
    end
  end
end
