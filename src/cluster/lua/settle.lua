-- Settles claims of this replica: all leave its pending set; those given
-- back are deleted, but only while this replica still holds them (a claim
-- that timed out may belong to another replica).
--
-- KEYS: 1 this replica's pending set, then the claims: first the kept, then
--       those given back.
-- ARGV: 1 replica id, 2 how many of the claims are kept.
local kept = tonumber(ARGV[2])
for i = 2, #KEYS do
  redis.call('SREM', KEYS[1], KEYS[i])
  if i - 1 > kept and redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
return #KEYS - 1
