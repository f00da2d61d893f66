-- Reads one bot's cluster totals at one instant.
--
-- KEYS: as sync.lua (1 series, 2 applied, 3 seeded, 4 today, 5 dirty,
--       6..29 hourly sketches, 30..59 daily sketches).
-- ARGV: 1 "1" to also read what the store needs: the applied marks, the
--       sketches changed since the last store write (name, what the store
--       keeps: exact_stored in exact.lua, which is prepended) and the
--       user book's changed users (8-byte key, entry or ''), 2 the most
--       users to read.
-- Returns {0} when the bot is not seeded, else {1, series (flat field,
-- value list), today (flat), users 1d, 7d, 30d[, applied (flat),
-- sketches (flat name, bytes), users (flat key, entry)]}.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return {0}
end
local hours, week, month = {}, {}, {}
for j = 6, 29 do hours[#hours + 1] = KEYS[j] end
for j = 30, 59 do month[#month + 1] = KEYS[j] end
for j = 53, 59 do week[#week + 1] = KEYS[j] end
local prefix = string.sub(KEYS[1], 1, #KEYS[1] - #'series')
local hour, day = exact_now()
local users = exact_count(prefix, hour, day, hours, week, month)
local out = {1, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[4]),
  users[1], users[2], users[3]}
if ARGV[1] == '1' then
  out[7] = redis.call('HGETALL', KEYS[2])
  local sketches = {}
  -- Same hash tag as KEYS[5], so the same slot.
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[5])) do
    sketches[#sketches + 1] = key
    sketches[#sketches + 1] = exact_stored(key) or ''
  end
  out[8] = sketches
  -- The user book's changed users and their entries ('' for one gone),
  -- at most ARGV[2] of them: the rest go at the next flushes. Same hash
  -- tag as KEYS[1], so the same slot.
  local users = {}
  local most = tonumber(ARGV[2] or '0')
  for _, key in ipairs(redis.call('SRANDMEMBER', prefix .. 'book:changed', most)) do
    users[#users + 1] = key
    users[#users + 1] = redis.call('HGET', prefix .. 'book', key) or ''
  end
  out[9] = users
end
return out
