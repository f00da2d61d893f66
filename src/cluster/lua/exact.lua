-- Exact counts of a small audience beside the HyperLogLog sketches
-- (prepended to sync.lua, read.lua, seed.lua and clean.lua).
--
-- Redis' HyperLogLog has no exact path for small counts: among 10 users it
-- misses one now and then, among 80 two (2.5 %), where botmetrics' own
-- sketch is exact up to 1,024 users. So each bot also keeps `u:seen`, a
-- sorted set of its users (their 8-byte keyed hashes) scored by the last
-- unix hour each was seen and pruned past the 30d window, and `u:seen:since`,
-- the hour from which the set holds every user. A window that starts at or
-- after `since` is counted exactly (ZCOUNT from its start, O(log n)); any
-- other by PFCOUNT over its sketches, whose error from 200 users up stays
-- within 2 % (measured: BENCHMARKS.md). Past EXACT_MAX users in 30 days the
-- set is dropped (`since` 'off') until Redis' 30-day estimate falls below
-- half of that; it then starts again, holding every user from the next hour.
local EXACT_MAX = 1024
local SEEN_TTL = 32 * 86400

local function seen_keys(prefix)
  return prefix .. 'u:seen', prefix .. 'u:seen:since'
end

-- The script's hour and day: those of its newest hourly and daily sketches
-- (KEYS 29 and 59, see sync.lua).
local function exact_now()
  return tonumber(string.match(KEYS[29], ':u:h:(%-?%d+)$')),
    tonumber(string.match(KEYS[59], ':u:d:(%-?%d+)$'))
end

-- The first hour of each window: 1d, 7d, 30d.
local function window_starts(hour, day)
  return {hour - 23, (day - 6) * 24, (day - 29) * 24}
end

-- ZADD GT CH of a flat (score, member, ...) list, in slices (unpack has a
-- stack limit). Returns how many members were new or scored higher.
local function zadd_all(key, flat)
  local changed = 0
  for i = 1, #flat, 1000 do
    changed = changed + redis.call('ZADD', key, 'GT', 'CH', unpack(flat, i, math.min(#flat, i + 999)))
  end
  return changed
end

-- Before a sync adds users: whether the set takes them, starting it for a
-- bot that has none yet. A bot none of whose sketches exist has had no user
-- in reach: the set holds them all from the start; else (a build before the
-- set, or its keys expired apart) from the next hour.
local function exact_open(prefix, hour, sketches)
  local seen, since_key = seen_keys(prefix)
  local since = redis.call('GET', since_key)
  if since then return since ~= 'off' end
  local start = 0
  if redis.call('EXISTS', unpack(sketches)) > 0 then start = hour + 1 end
  redis.call('DEL', seen)
  redis.call('SET', since_key, start, 'EX', SEEN_TTL)
  return true
end

-- Adds ARGV[from .. from + n - 1] (user hashes) seen at `hour` (a day's
-- first hour for a user known only by day: the 1d window does not reach
-- it). Returns how many were new or seen later than before.
local function exact_add(prefix, hour, from, n)
  local seen = seen_keys(prefix)
  local flat = {}
  for j = from, from + n - 1 do
    flat[#flat + 1] = hour
    flat[#flat + 1] = ARGV[j]
  end
  return zadd_all(seen, flat)
end

-- After a sync added users: prunes the set past the 30d window and drops it
-- past EXACT_MAX. Returns whether what the store keeps of it changed.
local function exact_settle(prefix, hour, day)
  local seen, since_key = seen_keys(prefix)
  local since = redis.call('GET', since_key)
  if not since or since == 'off' then return false end
  local pruned = redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. window_starts(hour, day)[3])
  if redis.call('ZCARD', seen) > EXACT_MAX then
    redis.call('DEL', seen)
    redis.call('SET', since_key, 'off', 'EX', SEEN_TTL)
    return true
  end
  redis.call('EXPIRE', seen, SEEN_TTL)
  redis.call('EXPIRE', since_key, SEEN_TTL)
  return pruned > 0
end

-- Distinct users in the 1d, 7d and 30d windows, whose sketches are
-- `hours`, `week` and `month`: exact where the set holds every user of the
-- window, else Redis' estimate.
local function exact_count(prefix, hour, day, hours, week, month)
  local seen, since_key = seen_keys(prefix)
  local since = tonumber(redis.call('GET', since_key) or '')
  local out = {}
  for i, sketches in ipairs({hours, week, month}) do
    local start = window_starts(hour, day)[i]
    if since and start >= since then
      out[i] = redis.call('ZCOUNT', seen, start, '+inf')
    else
      out[i] = redis.call('PFCOUNT', unpack(sketches))
    end
  end
  return out
end

-- A dropped set starts again once the 30-day estimate is below half its
-- bound (so a large bot does not fill and drop it at every sync). Returns
-- whether it did.
local function exact_restart(prefix, hour, month_users)
  local seen, since_key = seen_keys(prefix)
  if month_users >= EXACT_MAX / 2 or redis.call('GET', since_key) ~= 'off' then
    return false
  end
  redis.call('DEL', seen)
  redis.call('SET', since_key, hour + 1, 'EX', SEEN_TTL)
  return true
end

-- What the store keeps of a sketch key: a HyperLogLog's bytes, or for
-- `u:seen` `seen:<since>;` then per user its 8-byte hash and 4-byte hour
-- (little-endian), so that a reseed restores the set. false when gone.
local function exact_stored(key)
  if string.sub(key, -#'u:seen') ~= 'u:seen' then
    return redis.call('GET', key)
  end
  local since = redis.call('GET', key .. ':since')
  if not since then return false end
  local parts = {'seen:' .. since .. ';'}
  local flat = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for i = 1, #flat, 2 do
    if #flat[i] == 8 then
      parts[#parts + 1] = flat[i] .. struct.pack('<i4', tonumber(flat[i + 1]))
    end
  end
  return table.concat(parts)
end

-- Restores a sketch key from what exact_stored gave, for `ttl` seconds.
local function exact_restore(key, ttl, stored)
  local since, users = string.match(stored, '^seen:([%w]+);(.*)$')
  if string.sub(key, -#'u:seen') ~= 'u:seen' or not since then
    redis.call('SET', key, stored, 'EX', ttl)
    return
  end
  redis.call('DEL', key)
  redis.call('SET', key .. ':since', since, 'EX', ttl)
  local flat = {}
  for i = 1, #users - 11, 12 do
    flat[#flat + 1] = struct.unpack('<i4', users, i + 8)
    flat[#flat + 1] = string.sub(users, i, i + 7)
  end
  zadd_all(key, flat)
  redis.call('EXPIRE', key, ttl)
end
