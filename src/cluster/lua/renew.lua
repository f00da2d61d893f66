-- Extends the store-writer lease if this replica still holds it.
-- KEYS: 1 lease. ARGV: 1 replica id, 2 ttl in milliseconds.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
