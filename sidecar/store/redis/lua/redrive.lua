-- Moves every dead letter of one customer back into its outbox, unchanged (same id, same value).
-- KEYS: dead-letter hash, outbox hash. Returns how many summaries were moved.
local letters = redis.call('HGETALL', KEYS[1])
for i = 1, #letters, 2 do
  redis.call('HSET', KEYS[2], letters[i], cjson.encode(cjson.decode(letters[i + 1]).summary))
end
redis.call('DEL', KEYS[1])
return #letters / 2
