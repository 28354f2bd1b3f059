-- Add ids to (ARGV[1] = 'add') or remove them from ('rem') one bucket of the listing index, a
-- sorted set whose scores are all 0, so ZRANGEBYLEX pages through it in id order.
-- KEYS: the bucket. ARGV: 'add' or 'rem', then the ids. Returns how many changed.
local changed = 0
for i = 2, #ARGV do
  if ARGV[1] == 'add' then
    changed = changed + redis.call('ZADD', KEYS[1], 0, ARGV[i])
  else
    changed = changed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return changed
