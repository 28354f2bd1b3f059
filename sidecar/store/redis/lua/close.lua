-- Closes a customer's finished billing windows: every usage field whose window ended at or before
-- the cutoff moves, in one atomic step, from the usage hash into the customer's outbox as a
-- frozen summary. A unit is therefore in the usage hash or in the outbox, never both, never lost.
--
-- Fields are "<window>|<meter>|<feature>" → value, and, for unique meters, one field per distinct
-- value "u|<window>|<meter>|<feature>|<value>", counted here into the window's summary.
--
-- The summary id is sha1("<customer>|<meter>|<feature>|<window_start>|<revision>"): revision 1
-- for the first close of a window, 2 for units that reached it after that, and so on, so an
-- amended summary never reuses an id that billing may already have counted.
--
-- KEYS: usage hash, revisions hash, outbox hash, void fence (all of one customer)
-- ARGV: customer, plan, interval, cutoff, then pairs meter, aggregation
-- Returns {summaries moved, earliest window still open (-1 when none)}, or {-1, -1} while the
-- void fence is set (store/keys.py, void_fence): nothing moves until the journal's undo is in.
if redis.call('EXISTS', KEYS[4]) == 1 then return {-1, -1} end
local customer, plan = ARGV[1], ARGV[2]
local interval, cutoff = tonumber(ARGV[3]), tonumber(ARGV[4])
local aggregation = {}
for a = 5, #ARGV, 2 do aggregation[ARGV[a]] = ARGV[a + 1] end

-- "<window>|<meter>|<feature>[|<rest>]" → window, meter, feature, the summary's field name
local function parse(text)
  local first = string.find(text, '|', 1, true)
  local second = string.find(text, '|', first + 1, true)
  local third = string.find(text, '|', second + 1, true)
  local feature = string.sub(text, second + 1, third and third - 1 or nil)
  local meter = string.sub(text, first + 1, second - 1)
  local window = tonumber(string.sub(text, 1, first - 1))
  return window, meter, feature, window .. '|' .. meter .. '|' .. feature
end

local function emit(window, meter, feature, name, value)
  local revision = redis.call('HINCRBY', KEYS[2], name, 1)
  local id = redis.sha1hex(customer .. '|' .. meter .. '|' .. feature .. '|' .. window .. '|' .. revision)
  redis.call('HSET', KEYS[3], id, cjson.encode({
    id = id, customer = customer, plan = plan, meter = meter, feature = feature,
    aggregation = aggregation[meter] or 'sum', value = value,
    window_start = window, window_end = window + interval,
  }))
end

local fields = redis.call('HGETALL', KEYS[1])
local moved, open_window = 0, -1
local distinct = {}
for i = 1, #fields, 2 do
  local field = fields[i]
  local unique = string.sub(field, 1, 2) == 'u|'
  local window, meter, feature, name = parse(unique and string.sub(field, 3) or field)
  if window + interval > cutoff then
    if open_window == -1 or window < open_window then open_window = window end
  elseif unique then
    local group = distinct[name] or {window, meter, feature, 0}
    group[4] = group[4] + 1
    distinct[name] = group
    redis.call('HDEL', KEYS[1], field)
  else
    emit(window, meter, feature, name, tonumber(fields[i + 1]))
    redis.call('HDEL', KEYS[1], field)
    moved = moved + 1
  end
end
for name, group in pairs(distinct) do
  emit(group[1], group[2], group[3], name, group[4])
  moved = moved + 1
end
if moved > 0 then redis.call('EXPIRE', KEYS[2], 7 * 86400) end
return {moved, open_window}
