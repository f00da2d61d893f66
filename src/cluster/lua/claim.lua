-- Claims a request's event_ids for this replica, in one round trip.
--
-- A claim is a field of the bot's claim hash for the current time bucket
-- (`ids:<bucket>`, a bucket as long as the dedupe window, by Redis' own
-- clock so that every replica cuts the same buckets): field = the id's
-- keyed hash (8 bytes), value = the claiming replica. An id is looked up in
-- the current and the previous bucket, so it is remembered at least the
-- window (at most two) whenever it was claimed. Every step below is one
-- multi-field command for all of the request's ids (HMGET, HSET, SADD,
-- SMISMEMBER), not one `redis.call` per id: that per-call cost was what
-- bounded the ids/s one Redis core sustains.
--
-- A claim stays in the replica's pending set until the replica has the
-- event in its journal (it then confirms it) or gives it back. A retry
-- that finds another replica's *pending* claim cannot know yet whether
-- that replica will count the event, so it is told to retry, never that
-- it is a duplicate: no event is lost to a replica killed between claim
-- and journal, and none is counted twice.
--
-- Unless that replica is gone: each replica renews `alive:<replica>` (for
-- the liveness period) with every claim and, while it has claims
-- unsettled, from a heartbeat. A pending claim whose holder's key expired
-- is taken over here: moved to this replica and recorded in the holder's
-- `released` set, which the holder's journal replay leaves out should it
-- come back with its disk. So a replica that never returns delays its
-- requests' retries by at most the liveness period, not the window.
--
-- KEYS: 1 this replica's pending set, 2 this replica's alive key.
-- ARGV: 1 replica id, 2 window in ms, 3 the bot's key prefix (`bm:{bot}:`),
--       4 liveness in ms, 5 how long a released set is kept, in ms,
--       6... the ids (8 bytes each).
-- Returns one character per id: 0 claimed now (or taken over), 1 this
-- replica's already, 2 another replica's (a duplicate), 3 another
-- replica's, pending.
-- Every key touched shares the bot's hash tag: one slot. The bucket keys
-- are named here, from Redis' clock, so they are not in KEYS.
local me, window, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local FIRST = 6
local n = #ARGV - FIRST + 1
redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local bucket = math.floor(now / window)
-- %d: a Lua number turns into a string with 14 significant digits only.
local current = prefix .. 'ids:' .. string.format('%d', bucket)
local previous = prefix .. 'ids:' .. string.format('%d', bucket - 1)

-- unpack has a stack limit: every multi-field command goes in slices.
local SLICE = 1000
local function lookup(key)
  if n <= SLICE then
    return redis.call('HMGET', key, unpack(ARGV, FIRST))
  end
  local held = {}
  for first = FIRST, #ARGV, SLICE do
    local last = math.min(first + SLICE - 1, #ARGV)
    local part = redis.call('HMGET', key, unpack(ARGV, first, last))
    for j = 1, #part do
      held[first - FIRST + j] = part[j]
    end
  end
  return held
end
local now_held = lookup(current)
-- Only a request with ids not in the current bucket asks the previous one.
local missing = false
for i = 1, n do
  if not now_held[i] then
    missing = true
    break
  end
end
local before_held = {}
if missing then
  before_held = lookup(previous)
end

-- The same id twice in one request is claimed twice (one field, one
-- member): the replica's own dedupe then counts it once, and settles it
-- twice, harmlessly. Tracking repeats here would cost every id a table
-- insert.
local out = {}
local claimed = {}
-- Ids of other replicas, per holder: whether they are still pending is
-- asked once per holder, for all its ids at once.
local others = {}
for i = 1, n do
  local id = ARGV[FIRST + i - 1]
  local holder = now_held[i] or before_held[i]
  if not holder then
    claimed[#claimed + 1] = id
    out[i] = '0'
  elseif holder == me then
    out[i] = '1'
  else
    local of = others[holder]
    if not of then
      of = {}
      others[holder] = of
    end
    of[#of + 1] = i
    out[i] = '2'
  end
end

for holder, of in pairs(others) do
  local ids = {}
  for j = 1, #of do
    ids[j] = ARGV[FIRST + of[j] - 1]
  end
  local pending = {}
  for first = 1, #ids, SLICE do
    local part = redis.call('SMISMEMBER', prefix .. 'pending:' .. holder,
      unpack(ids, first, math.min(first + SLICE - 1, #ids)))
    for j = 1, #part do
      pending[first + j - 1] = part[j]
    end
  end
  local alive = redis.call('EXISTS', prefix .. 'alive:' .. holder) == 1
  local taken = {}
  for j = 1, #ids do
    if pending[j] == 1 then
      local i = of[j]
      if alive then
        out[i] = '3'
      else
        taken[#taken + 1] = ids[j]
        claimed[#claimed + 1] = ids[j]
        -- Claimed again below, in the current bucket; a copy left in the
        -- previous one would name the old holder again once this claim is
        -- given back.
        if not now_held[i] then
          redis.call('HDEL', previous, ids[j])
        end
        out[i] = '0'
      end
    end
  end
  for first = 1, #taken, SLICE do
    local part = { unpack(taken, first, math.min(first + SLICE - 1, #taken)) }
    redis.call('SREM', prefix .. 'pending:' .. holder, unpack(part))
    redis.call('SADD', prefix .. 'released:' .. holder, unpack(part))
  end
  if #taken > 0 then
    redis.call('PEXPIRE', prefix .. 'released:' .. holder, ARGV[5])
  end
end

if #claimed > 0 then
  for first = 1, #claimed, SLICE do
    local last = math.min(first + SLICE - 1, #claimed)
    local fields = {}
    for j = first, last do
      fields[#fields + 1] = claimed[j]
      fields[#fields + 1] = me
    end
    redis.call('HSET', current, unpack(fields))
    redis.call('SADD', KEYS[1], unpack(claimed, first, last))
  end
  -- The bucket is read until the end of the next one.
  redis.call('PEXPIREAT', current, string.format('%d', (bucket + 2) * window))
  -- The pending set outlives every claim it may name.
  redis.call('PEXPIRE', KEYS[1], string.format('%d', 2 * window))
end
return table.concat(out)
