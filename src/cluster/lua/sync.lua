-- Applies one replica's deltas for one bot, at most once, and answers the
-- cluster-wide distinct-user estimates. Every key carries the bot's hash
-- tag, so in a Redis Cluster this runs on one node, atomically.
--
-- KEYS: 1 series hash, 2 applied hash, 3 seeded marker, 4 today hash,
--       5 dirty-sketch set, 6..29 the 24 hourly sketches of the 1d window,
--       30..59 the 30 daily sketches of the 30d window (oldest first),
--       then any sketch a user below is added to.
-- ARGV: 1 replica id, 2 mark (journal LSN; 0 = nothing to apply),
--       3 series count, 4 today count, 5 sketch group count,
--       6 oldest "today" date kept, 7 the mark this replica believes Redis
--       holds for it, 8 the latest wipe of the bot this replica applied
--       (unix ms, 0: none), then series (field, delta) pairs, today (field,
--       delta) pairs, and sketch groups (key index, ttl seconds, n, n user
--       hashes), then, when the bot's user book is shared, its section
--       (see book_merge in book.lua, which is prepended to this script).
-- The counts are exact while a bot's audience is small (exact.lua, which
-- is prepended with book.lua).
-- Returns {status, users 1d, users 7d, users 30d, the replica's mark in
-- Redis before this call[, then what the user book's merge found: new
-- users, and (seconds, messages) per ended session]}. Status 1: applied; 2: already applied (the
-- reply to an earlier attempt was lost); 3: not applied, Redis holds less
-- of this replica than it believes (Redis lost data and was reseeded from
-- the store): it sends the missing part first; 0: not applied, the bot is
-- not seeded; 4: not applied, the bot was wiped (wipe.lua) since this
-- replica last heard, and the last value is the wipe's generation: it drops
-- what it counted of the bot before, this batch included.
local prefix = string.sub(KEYS[1], 1, #KEYS[1] - #'series')
local hour, day = exact_now()
local seeded = redis.call('GET', KEYS[3])
if not seeded then
  return {0, 0, 0, 0, 0}
end
-- A replica with a mark set since the wipe (which deleted every mark) has
-- applied it: after a restart it may not remember the generation.
local wiped = tonumber(string.match(seeded, '^wiped:(%d+)$') or '0')
if wiped > tonumber(ARGV[8]) and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  return {4, 0, 0, 0, wiped}
end
local before = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local mark = tonumber(ARGV[2])
local status = 1
-- What the user book's merge found in this batch (new users, ended
-- sessions), for the replica's own /metrics.
local found = {}
if mark > 0 then
  if before >= mark then
    status = 2
  elseif before < tonumber(ARGV[7]) then
    status = 3
  end
end
if status == 1 and mark > 0 then
  -- Redis does not undo a script's writes when a later command fails, so
  -- what can fail on a damaged key (PFADD on a sketch that is not one) runs
  -- first: a failure then leaves no counter added and the mark unset, and
  -- adding users again is harmless.
  local n_series, n_today = tonumber(ARGV[3]), tonumber(ARGV[4])
  local i = 9 + 2 * n_series + 2 * n_today
  local exact = exact_open(prefix, hour, {unpack(KEYS, 6, 59)})
  local exact_changed = false
  for _ = 1, tonumber(ARGV[5]) do
    local key = KEYS[tonumber(ARGV[i])]
    local ttl = ARGV[i + 1]
    local n = tonumber(ARGV[i + 2])
    i = i + 3
    if exact then
      local h = tonumber(string.match(key, ':u:h:(%-?%d+)$'))
      if not h then h = tonumber(string.match(key, ':u:d:(%-?%d+)$')) * 24 end
      if exact_add(prefix, h, i, n) > 0 then exact_changed = true end
    end
    local changed = 0
    local done_in_group = 0
    while done_in_group < n do
      -- unpack has a stack limit: add in slices.
      local m = math.min(1000, n - done_in_group)
      changed = changed + redis.call('PFADD', key, unpack(ARGV, i + done_in_group, i + done_in_group + m - 1))
      done_in_group = done_in_group + m
    end
    i = i + n
    redis.call('EXPIRE', key, ttl)
    if changed > 0 then redis.call('SADD', KEYS[5], key) end
  end
  if exact and exact_settle(prefix, hour, day) then exact_changed = true end
  if exact_changed then redis.call('SADD', KEYS[5], prefix .. 'u:seen') end
  if i <= #ARGV then found = book_merge(i) end
  i = 9
  for _ = 1, n_series do
    redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  for _ = 1, n_today do
    redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  if n_today > 0 then
    for _, field in ipairs(redis.call('HKEYS', KEYS[4])) do
      if string.sub(field, 1, 10) < ARGV[6] then redis.call('HDEL', KEYS[4], field) end
    end
  end
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
local hours, week, month = {}, {}, {}
for j = 6, 29 do hours[#hours + 1] = KEYS[j] end
for j = 30, 59 do month[#month + 1] = KEYS[j] end
for j = 53, 59 do week[#week + 1] = KEYS[j] end
local users = exact_count(prefix, hour, day, hours, week, month)
if status == 1 and mark > 0 and exact_restart(prefix, hour, users[3]) then
  redis.call('SADD', KEYS[5], prefix .. 'u:seen')
end
local out = {status, users[1], users[2], users[3], before}
for _, n in ipairs(found) do out[#out + 1] = n end
return out
