-- Adds one grant of prepaid credit, once: a retried grant with the same id counts once.
-- KEYS: grants record (hash id → grant JSON), grants left, grant expiries, overdraft (lib.lua).
-- ARGV: id, the grant as canonical JSON, amount, expiry score (unix seconds, or '+inf').
-- Returns 1 added, 0 already added with the same content, -1 the id names a different grant.
-- What was used beyond earlier grants (the overdraft) is paid from the new grant first.
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  if existing == ARGV[2] then return 0 end
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local amount = tonumber(ARGV[3])
local owed = tonumber(redis.call('GET', KEYS[4]) or '0')
local paid = math.min(math.max(owed, 0), amount)
if paid > 0 then redis.call('DECRBY', KEYS[4], string.format('%d', paid)) end
redis.call('HSET', KEYS[2], ARGV[1], string.format('%d', amount - paid), 'a:' .. ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
