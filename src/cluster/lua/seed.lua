-- Reseeds one bot's cluster totals from the store, unless another replica
-- did it first. Nothing syncs into a bot before its seeded marker is set,
-- so a Redis that lost its data never zeroes or doubles a total.
--
-- KEYS: 1 series, 2 applied, 3 seeded, 4 today, 5 dirty, then the sketches
--       to restore.
-- ARGV: 1 series count, 2 applied count, 3 today count, 4 sketch count,
--       5 marker value, 6 the index of the user book's load token key
--       ('0' when the book is not shared), 7 this replica's load token,
--       then (field, value) pairs for series, applied and today, then
--       (key index, ttl seconds, what the store keeps) per sketch (see
--       exact_stored in exact.lua, which is prepended).
-- Returns 1 when it seeded, 0 when the bot already was, or when another
-- replica took the book's load over (book_seed.lua): that one seeds.
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
local token_key = tonumber(ARGV[6])
if token_key > 0 then
  if redis.call('GET', KEYS[token_key]) ~= ARGV[7] then return 0 end
  redis.call('DEL', KEYS[token_key])
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4], KEYS[5])
local i = 8
local function fill(key, n)
  for _ = 1, n do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
fill(KEYS[1], tonumber(ARGV[1]))
fill(KEYS[2], tonumber(ARGV[2]))
fill(KEYS[4], tonumber(ARGV[3]))
for _ = 1, tonumber(ARGV[4]) do
  exact_restore(KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
redis.call('SET', KEYS[3], ARGV[5])
return 1
