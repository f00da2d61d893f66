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
-- KEYS: 1 this replica's pending set, then the claims.
-- ARGV: 1 replica id, 2 window in ms, 3 the bot's pending-set prefix.
-- Returns per claim: 0 claimed now, 1 this replica's already,
-- 2 another replica's (a duplicate), 3 another replica's, pending.
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
    -- Same hash tag as the claim: the same slot.
    out[#out + 1] = 3
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
