-- Claims a request's event_ids for this replica, in one round trip.
--
-- A claim is `<claim key> = <replica>` for the dedupe window, and stays in
-- the replica's pending set until the replica has the event in its
-- journal (it then confirms it) or gives it back. A retry that finds
-- another replica's *pending* claim cannot know yet whether that replica
-- will count the event, so it is told to retry, never that it is a
-- duplicate: no event is lost to a replica killed between claim and
-- journal, and none is counted twice.
--
-- Unless that replica is gone: each replica renews `alive:<replica>` (for
-- the liveness period) with every claim and, while it has claims
-- unsettled, from a heartbeat. A pending claim whose holder's key expired
-- is taken over here: moved to this replica and recorded in the holder's
-- `released` set, which the holder's journal replay leaves out should it
-- come back with its disk. So a replica that never returns delays its
-- requests' retries by at most the liveness period, not the window.
--
-- KEYS: 1 this replica's pending set, then the claims.
-- ARGV: 1 replica id, 2 window in ms, 3 the bot's pending-set prefix,
--       4 liveness in ms, 5 the bot's alive-key prefix, 6 the bot's
--       released-set prefix, 7 how long a released set is kept, in ms.
-- Returns per claim: 0 claimed now (or taken over), 1 this replica's
-- already, 2 another replica's (a duplicate), 3 another replica's, pending.
-- Every key touched shares the bot's hash tag: one slot.
redis.call('SET', ARGV[5] .. ARGV[1], '1', 'PX', ARGV[4])
local out = {}
local claimed = {}
for i = 2, #KEYS do
  -- One command claims a free id and names the holder of a taken one.
  local holder = redis.call('SET', KEYS[i], ARGV[1], 'NX', 'GET', 'PX', ARGV[2])
  if not holder then
    claimed[#claimed + 1] = KEYS[i]
    out[#out + 1] = 0
  elseif holder == ARGV[1] then
    out[#out + 1] = 1
  elseif redis.call('SISMEMBER', ARGV[3] .. holder, KEYS[i]) == 1 then
    if redis.call('EXISTS', ARGV[5] .. holder) == 1 then
      out[#out + 1] = 3
    else
      redis.call('SREM', ARGV[3] .. holder, KEYS[i])
      redis.call('SADD', ARGV[6] .. holder, KEYS[i])
      redis.call('PEXPIRE', ARGV[6] .. holder, ARGV[7])
      redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
      claimed[#claimed + 1] = KEYS[i]
      out[#out + 1] = 0
    end
  else
    out[#out + 1] = 2
  end
end
-- unpack has a stack limit: add in slices.
for first = 1, #claimed, 1000 do
  redis.call('SADD', KEYS[1], unpack(claimed, first, math.min(first + 999, #claimed)))
end
if #claimed > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return out
