-- Settles delivered or refused notifications of one customer (billing/notifier.py).
-- KEYS: notification outbox, notification dead letters (of one customer)
-- ARGV: mode ('ack' | 'dead'), reason (for 'dead'), then crossings
-- 'ack' deletes them; 'dead' moves each, as recorded, to the dead letters with the reason.
-- Returns how many notifications still wait in the outbox.
for a = 3, #ARGV do
  local record = redis.call('HGET', KEYS[1], ARGV[a])
  if record and ARGV[1] == 'dead' then
    redis.call('HSET', KEYS[2], ARGV[a], cjson.encode({record = record, reason = ARGV[2]}))
  end
  redis.call('HDEL', KEYS[1], ARGV[a])
end
return redis.call('HLEN', KEYS[1])
