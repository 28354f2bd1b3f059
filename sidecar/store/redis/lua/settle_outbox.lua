-- Settles delivered or rejected summaries of one customer's outbox.
-- KEYS: outbox hash, dead-letter hash (of one customer)
-- ARGV: mode ('ack' | 'dead'), reason (for 'dead'), then summary ids
-- 'ack' deletes them; 'dead' moves them to the dead-letter hash with the reason.
-- Returns how many summaries are still waiting in the outbox.
for a = 3, #ARGV do
  local summary = redis.call('HGET', KEYS[1], ARGV[a])
  if summary and ARGV[1] == 'dead' then
    redis.call('HSET', KEYS[2], ARGV[a], cjson.encode({summary = cjson.decode(summary), reason = ARGV[2]}))
  end
  redis.call('HDEL', KEYS[1], ARGV[a])
end
return redis.call('HLEN', KEYS[1])
