-- Moves every notification dead letter of one customer back into its outbox, as it was recorded
-- (same crossing, so the same id).
-- KEYS: notification dead letters, notification outbox. Returns how many were moved.
local letters = redis.call('HGETALL', KEYS[1])
for i = 1, #letters, 2 do
  redis.call('HSET', KEYS[2], letters[i], cjson.decode(letters[i + 1]).record)
end
redis.call('DEL', KEYS[1])
return #letters / 2
