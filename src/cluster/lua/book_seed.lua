-- Loads a part of a bot's stored user book into Redis before its totals
-- are seeded (seed.lua), in parts so that no one call keeps Redis busy.
-- The first part (ARGV[2] = '1') empties the book and claims the load for
-- this replica's token; later parts land only while the load is still
-- this replica's and the bot not seeded, so two replicas seeding at once
-- never leave half of each other's book.
--
-- KEYS: 1 book, 2 changed users, 3 load token, 4 seeded marker.
-- ARGV: 1 token, 2 '1' for the first part, then (8-byte key, 20 bytes)
-- pairs. Returns 1 when the part landed, 0 when not.
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SET', KEYS[3], ARGV[1], 'EX', 3600)
elseif redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return 0
end
for j = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
end
return 1
