-- Read one key of the customer directory as it stands: an API key's owner entry (a string) or a
-- customer's document (a hash). One script for both, so a lookup rides the script batcher's
-- pipeline with the requests' own calls (store/redis/customers.py).
-- KEYS: the key. Returns the string, the hash's field/value list, or false when it does not exist.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  return redis.call('GET', KEYS[1])
elseif kind == 'hash' then
  return redis.call('HGETALL', KEYS[1])
end
return false
