-- Closes a customer's finished billing windows: every usage field whose window ended at or before
-- the cutoff moves, in one atomic step, from the usage hash into the customer's outbox as a
-- frozen summary. A unit is therefore in the usage hash or in the outbox, never both, never lost.
--
-- The summary id is sha1("<customer>|<meter>|<feature>|<window_start>|<revision>"): revision 1
-- for the first close of a window, 2 for units that reached it after that, and so on, so an
-- amended summary never reuses an id that billing may already have counted.
--
-- KEYS: usage hash, revisions hash, outbox hash (all of one customer)
-- ARGV: customer, plan, interval, cutoff, then pairs meter, aggregation
-- Returns {summaries moved, earliest window still open (-1 when none)}
local customer, plan = ARGV[1], ARGV[2]
local interval, cutoff = tonumber(ARGV[3]), tonumber(ARGV[4])
local aggregation = {}
for a = 5, #ARGV, 2 do aggregation[ARGV[a]] = ARGV[a + 1] end

local fields = redis.call('HGETALL', KEYS[1])
local moved, open_window = 0, -1
for i = 1, #fields, 2 do
  local field, value = fields[i], fields[i + 1]
  local first, second = string.find(field, '|', 1, true), nil
  second = string.find(field, '|', first + 1, true)
  local window = tonumber(string.sub(field, 1, first - 1))
  local meter = string.sub(field, first + 1, second - 1)
  local feature = string.sub(field, second + 1)
  if window + interval <= cutoff then
    local revision = redis.call('HINCRBY', KEYS[2], field, 1)
    local id = redis.sha1hex(customer .. '|' .. meter .. '|' .. feature .. '|' .. window .. '|' .. revision)
    redis.call('HSET', KEYS[3], id, cjson.encode({
      id = id, customer = customer, plan = plan, meter = meter, feature = feature,
      aggregation = aggregation[meter] or 'sum', value = tonumber(value),
      window_start = window, window_end = window + interval,
    }))
    redis.call('HDEL', KEYS[1], field)
    moved = moved + 1
  elseif open_window == -1 or window < open_window then
    open_window = window
  end
end
if moved > 0 then redis.call('EXPIRE', KEYS[2], 7 * 86400) end
return {moved, open_window}
