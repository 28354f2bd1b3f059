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
