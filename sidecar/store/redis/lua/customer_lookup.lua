-- A request's lookup of an API key on one server (or a Sentinel master), in one call: the key's
-- owner entry, and that owner's document. The document's key is built here from the text keys.py
-- puts around a customer id (ARGV), a key this script does not declare: so it runs on one server
-- only, never on a Cluster, where the two keys live on different slots and take two calls.
-- KEYS: the key's owner entry. ARGV: the document key's text before and after the customer id.
-- Returns false when nobody claimed the key, else {the owner entry, the owner's document as a
-- field/value list (empty when it has none)}.
local entry = redis.call('GET', KEYS[1])
if not entry then
  return false
end
local owner = string.match(entry, '^(%S+)')
return {entry, redis.call('HGETALL', ARGV[1] .. owner .. ARGV[2])}
