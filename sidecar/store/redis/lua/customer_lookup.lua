-- A request's lookup of an API key on one server (or a Sentinel master), in one call: the key's
-- owner entry, and that owner's document. The document's key is built here from the text keys.py
-- puts around a customer id (ARGV), a key this script does not declare: so it runs on one server
-- only, never on a Cluster, where the two keys live on different slots and take two calls.
-- KEYS: the key's owner entry. ARGV: the document key's text before and after the customer id,
-- then, for a key a policy file gives to a customer, that customer's id.
-- Returns false when nobody claimed the key, else {the owner entry, the owner's document as a
-- field/value list (empty when it has none)}. With a file customer's id: always
-- {the owner entry or '', the owner's document, the file customer's stored document} (the last
-- two the same when the owner is that customer), so a file customer costs one call, not two.
local entry = redis.call('GET', KEYS[1])
local owner = entry and string.match(entry, '^(%S+)')
local owned = owner and redis.call('HGETALL', ARGV[1] .. owner .. ARGV[2]) or {}
local file_id = ARGV[3]
if not file_id then
  if not entry then return false end
  return {entry, owned}
end
local filed = owned
if owner ~= file_id then filed = redis.call('HGETALL', ARGV[1] .. file_id .. ARGV[2]) end
return {entry or '', owned, filed}
