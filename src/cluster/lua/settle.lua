-- Settles claims of this replica: all leave its pending set (one SREM for
-- all of them); those given back are deleted from the claim buckets, but
-- only while this replica still holds them (a claim that timed out may
-- belong to another replica now).
--
-- KEYS: 1 this replica's pending set.
-- ARGV: 1 replica id, 2 window in ms, 3 the bot's key prefix, 4 how many
--       of the ids are kept, 5... the ids (8 bytes each): first the kept,
--       then those given back.
-- Returns the number of ids settled.
local me, window, prefix, kept = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local FIRST = 5
local SLICE = 1000
for first = FIRST, #ARGV, SLICE do
  redis.call('SREM', KEYS[1], unpack(ARGV, first, math.min(first + SLICE - 1, #ARGV)))
end
local back = FIRST + kept
if back <= #ARGV then
  -- The buckets claim.lua reads now: a claim in an older one has expired.
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local bucket = math.floor(now / window)
  for _, b in ipairs({ bucket, bucket - 1 }) do
    local key = prefix .. 'ids:' .. string.format('%d', b)
    for first = back, #ARGV, SLICE do
      local last = math.min(first + SLICE - 1, #ARGV)
      local held = redis.call('HMGET', key, unpack(ARGV, first, last))
      local mine = {}
      for j = 1, #held do
        if held[j] == me then
          mine[#mine + 1] = ARGV[first + j - 1]
        end
      end
      if #mine > 0 then
        redis.call('HDEL', key, unpack(mine))
      end
    end
  end
end
return #ARGV - FIRST + 1
