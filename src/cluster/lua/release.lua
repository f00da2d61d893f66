-- Gives up the store-writer lease (on the way out), if still held.
-- KEYS: 1 lease. ARGV: 1 replica id.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
