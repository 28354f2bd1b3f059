-- Take one API key from a stored customer.
-- KEYS: the document. ARGV: key hash.
-- Returns the token its claim was stamped with (to give the claim back), false when the customer
-- does not have it, 0 when there is no such customer.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'd') == 1 then
  return 0
end
local token = redis.call('HGET', KEYS[1], ARGV[1])
if not token then
  return false
end
redis.call('HDEL', KEYS[1], ARGV[1])
return token
