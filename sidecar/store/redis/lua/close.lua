-- Closes a customer's finished billing windows: every usage field whose window ended at or before
-- the cutoff moves, in one atomic step, from the usage hash into the customer's outbox as a
-- frozen summary. A unit is therefore in the usage hash or in the outbox, never both, never lost.
--
-- Fields are "<window>|<meter>|<feature>" → value, and, for unique meters, one field per distinct
-- value "u|<window>|<meter>|<feature>|<value>" (lib.lua record_usage).
--
-- A unique meter is billed as first sightings in the customer's billing month (SPEC §6): a value
-- counts in the first window of that month it is closed in, and never again that month, so the
-- summaries of one month add up to its distinct count (Stripe, Lago and OpenMeter can only add
-- them). Each (customer, meter, month) keeps the values it has billed in a set,
-- "<tag>:us:<meter>:<month start>" (store/keys.py, first_seen), as the first 16 hex digits of
-- the value's SHA-1 (a fixed size whatever the value; a false "seen" needs a 64-bit collision
-- within one customer's month), expiring 7 days after the month ends (or its last window, or
-- this close, whichever is latest), so late units closed in that time are still recognised. Windows close oldest first
-- within one call, so a value is counted in its earliest window here; a unit that reaches an
-- older window after a later one was closed (a journal merged after an outage) is counted where
-- it was first closed, still once. A window with no first sighting makes no summary.
--
-- The summary id is sha1("[<namespace>|]<customer>|<meter>|<feature>|<window_start>|<revision>"):
-- revision 1 for the first close of a window, 2 for units that reached it after that, and so on,
-- so an amended summary never reuses an id that billing may already have counted. The namespace
-- (billing.namespace) is left out, and not stored, for the default one, so ids stay those of
-- the releases before it (store/summaries.py, summary_id, computes the same).
--
-- KEYS: usage hash, revisions hash, outbox hash, void fence (all of one customer)
-- ARGV: customer, plan, interval, cutoff, billing anchor day (1-31), namespace ('' for the
--       default), history days (0: keep none), then pairs meter, aggregation
--
-- Usage history (SPEC §7; store/redis/history.py reads it): each summary is also added to the
-- history hash of its hour ("<tag>:hh:<hour start>", windows shorter than HISTORY_SHORT) or day
-- ("<tag>:hd:<day start>"), built here from the usage key's name (store/keys.py, history_bucket),
-- field "<window start - bucket start>|<window length>|<meter>|<feature>": the revisions of a
-- window add up (max and min keep the extreme), and the hash expires `history days` after its
-- bucket ends. A bucket holds at most a few hundred fields, so Redis keeps it compact.
-- Returns {summaries moved, earliest window still open (-1 when none)}, or {-1, -1} while the
-- void fence is set (store/keys.py, void_fence): nothing moves until the journal's undo is in.
if redis.call('EXISTS', KEYS[4]) == 1 then return {-1, -1} end
local customer, plan = ARGV[1], ARGV[2]
local interval, cutoff = tonumber(ARGV[3]), tonumber(ARGV[4])
local anchor_day, namespace, history_days = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local aggregation = {}
for a = 8, #ARGV, 2 do aggregation[ARGV[a]] = ARGV[a + 1] end
local DAY = 86400
local SEEN_KEPT = 7 * DAY
local now = tonumber(redis.call('TIME')[1])

-- Calendar arithmetic on days since 1970-01-01 (H. Hinnant's civil algorithms), the same months
-- as config/policy/windows.py: a month starts on the anchor day, or on the month's last day when
-- it is shorter.
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local month = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (month <= 2 and 1 or 0), month
end

local function days_from_civil(year, month, day)
  if month <= 2 then year = year - 1 end
  local era = math.floor(year / 400)
  local yoe = year - era * 400
  local mp = month > 2 and month - 3 or month + 9
  local doy = math.floor((153 * mp + 2) / 5) + day - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

local function shift(year, month, delta)
  local index = year * 12 + (month - 1) + delta
  return math.floor(index / 12), index % 12 + 1
end

local function anchored(year, month)
  local next_year, next_month = shift(year, month, 1)
  local length = days_from_civil(next_year, next_month, 1) - days_from_civil(year, month, 1)
  return days_from_civil(year, month, math.min(anchor_day, length)) * DAY
end

-- The billing month [start, end) containing `t` (epoch seconds).
local function month_of(t)
  local year, month = civil(math.floor(t / DAY))
  local start = anchored(year, month)
  if t < start then
    year, month = shift(year, month, -1)
    start = anchored(year, month)
  end
  return start, anchored(shift(year, month, 1))
end

-- "<window>|<meter>|<feature>[|<rest>]" → window, meter, feature, the summary's field name, rest
local function parse(text)
  local first = string.find(text, '|', 1, true)
  local second = string.find(text, '|', first + 1, true)
  local third = string.find(text, '|', second + 1, true)
  local feature = string.sub(text, second + 1, third and third - 1 or nil)
  local meter = string.sub(text, first + 1, second - 1)
  local window = tonumber(string.sub(text, 1, first - 1))
  local rest = third and string.sub(text, third + 1) or nil
  return window, meter, feature, window .. '|' .. meter .. '|' .. feature, rest
end

local HISTORY_SHORT = 1800  -- history.SHORT_WINDOW: shorter windows are kept an hour a hash

local function keep_history(window, meter, feature, value)
  if history_days <= 0 then return end
  local span, kind = DAY, 'hd:'
  if interval < HISTORY_SHORT then span, kind = 3600, 'hh:' end
  local bucket = window - window % span
  local key = string.sub(KEYS[1], 1, -2) .. kind .. bucket
  local field = (window - bucket) .. '|' .. interval .. '|' .. meter .. '|' .. feature
  local how = aggregation[meter]
  if how == 'max' or how == 'min' then
    local current = tonumber(redis.call('HGET', key, field))
    if current == nil or (how == 'max' and value > current) or (how == 'min' and value < current) then
      redis.call('HSET', key, field, value)
    end
  else
    redis.call('HINCRBY', key, field, value)
  end
  redis.call('EXPIREAT', key, bucket + span + history_days * DAY)
end

-- Revisions are counted per day of windows ("<tag>:rv:<day start>"), and a day's hash expires
-- REVISIONS_KEPT after the day ends: the longest a unit can still reach a window after it was
-- closed (a usage record up to events.max_age_days old, a journal merged within its markers'
-- week). One hash of every window a customer ever closed grew without bound while the customer
-- stayed active, and expired a week after the last close, after which a late record's summary
-- would have reused revision 1's id. KEYS[2], that hash, is still read for a window it counted
-- (the release before), and no longer written.
local REVISIONS_KEPT = 40 * DAY

local function next_revision(window, name)
  local day = window - window % DAY
  local key = string.sub(KEYS[1], 1, -2) .. 'rv:' .. day
  local revision = redis.call('HINCRBY', key, name, 1)
  if revision == 1 then
    local before = tonumber(redis.call('HGET', KEYS[2], name))
    if before then
      revision = before + 1
      redis.call('HSET', key, name, revision)
    end
  end
  redis.call('EXPIREAT', key, day + DAY + REVISIONS_KEPT)
  return revision
end

local function emit(window, meter, feature, name, value)
  keep_history(window, meter, feature, value)
  local revision = next_revision(window, name)
  local prefix = namespace == '' and '' or namespace .. '|'
  local id = redis.sha1hex(prefix .. customer .. '|' .. meter .. '|' .. feature .. '|' .. window .. '|' .. revision)
  redis.call('HSET', KEYS[3], id, cjson.encode({
    id = id, customer = customer, plan = plan, meter = meter, feature = feature,
    aggregation = aggregation[meter] or 'sum', value = value,
    window_start = window, window_end = window + interval,
    namespace = namespace ~= '' and namespace or nil,
  }))
end

-- True when `value` of `meter` is first seen (billed) in the month of `window`; remembers it.
local function first_sighting(window, meter, value)
  local start, finish = month_of(window)
  local seen = string.sub(KEYS[1], 1, -2) .. 'us:' .. meter .. ':' .. start
  local added = redis.call('SADD', seen, string.sub(redis.sha1hex(value), 1, 16))
  redis.call('EXPIREAT', seen, math.max(finish, window + interval, now) + SEEN_KEPT)
  return added == 1
end

-- Bills the unique values closed, oldest window first: each group {window, meter, feature, name,
-- values} becomes a summary of its first sightings, or nothing when it has none.
local function emit_unique(groups)
  table.sort(groups, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[4] < b[4]
  end)
  local moved = 0
  for _, group in ipairs(groups) do
    table.sort(group[5])
    local first = 0
    for _, value in ipairs(group[5]) do
      if first_sighting(group[1], group[2], value) then first = first + 1 end
    end
    if first > 0 then
      emit(group[1], group[2], group[3], group[4], first)
      moved = moved + 1
    end
  end
  return moved
end

local fields = redis.call('HGETALL', KEYS[1])
local moved, open_window = 0, -1
local distinct, groups = {}, {}
for i = 1, #fields, 2 do
  local field = fields[i]
  local unique = string.sub(field, 1, 2) == 'u|'
  local window, meter, feature, name, value = parse(unique and string.sub(field, 3) or field)
  if window + interval > cutoff then
    if open_window == -1 or window < open_window then open_window = window end
  elseif unique then
    local group = distinct[name]
    if not group then
      group = {window, meter, feature, name, {}}
      distinct[name] = group
      groups[#groups + 1] = group
    end
    group[5][#group[5] + 1] = value
    redis.call('HDEL', KEYS[1], field)
  else
    emit(window, meter, feature, name, tonumber(fields[i + 1]))
    redis.call('HDEL', KEYS[1], field)
    moved = moved + 1
  end
end
moved = moved + emit_unique(groups)
return {moved, open_window}
