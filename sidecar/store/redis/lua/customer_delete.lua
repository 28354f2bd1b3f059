-- Delete a customer: its document becomes a tombstone without keys (plan, anchor and billing
-- ids stay, so summaries still pending can be billed), kept ARGV[1] seconds; with ARGV[2] = '1'
-- it is kept until the purge erases it, and the purge marker is set.
-- KEYS: the document, the purge marker. ARGV: seconds to keep the tombstone, purge ('1'/'0').
-- Returns {1, the document before} when a live customer was deleted, {2} when it was deleted
-- already (a purge is still scheduled if asked), {0} when there is no such customer.
local before = redis.call('HGETALL', KEYS[1])
if #before == 0 then
  return {0}
end
local status = 2
if redis.call('HEXISTS', KEYS[1], 'd') == 0 then
  status = 1
  for i = 1, #before, 2 do
    if string.len(before[i]) == 64 then
      redis.call('HDEL', KEYS[1], before[i])
    end
  end
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'd', t[1])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
end
if ARGV[2] == '1' then
  redis.call('SET', KEYS[2], '1')
  redis.call('PERSIST', KEYS[1])
end
return {status, before}
