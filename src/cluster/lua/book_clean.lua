-- Unmarks the users the store now holds, unless a sync or a scan changed
-- one since it was read: that one stays marked for the next write.
--
-- KEYS: 1 book, 2 changed users.
-- ARGV: (8-byte key, the bytes written or '' for a removed user) pairs.
local cleaned = 0
for j = 1, #ARGV, 2 do
  local held = redis.call('HGET', KEYS[1], ARGV[j]) or ''
  if held == ARGV[j + 1] then
    redis.call('SREM', KEYS[2], ARGV[j])
    cleaned = cleaned + 1
  end
end
return cleaned
