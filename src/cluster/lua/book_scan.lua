-- Applies what the lead's scan of the book decided (appended to book.lua):
-- each change lands only if the entry is still what the scan read, so an
-- entry a sync merged meanwhile is left for the next scan, and a session
-- is counted once in the cluster.
--
-- KEYS: 1 series, 2 today, 3 book, 4 changed users, 5 seeded marker.
-- ARGV: the counting section (see book_counting), then n changes, then per
-- change: 8-byte key, the 20 bytes read, the bytes to write ('' to remove
-- the user), and the ended session's seconds, messages and last ts (-1 -1
-- -1 when none).
-- Returns {applied count, then c.found()}.
if redis.call('EXISTS', KEYS[5]) == 0 then
  return {0, 0}
end
book_check_types(KEYS[3], KEYS[4])
local c, i = book_counting(KEYS[1], KEYS[2], 1)
local applied = 0
for _ = 1, tonumber(ARGV[i]) do
  local key, read, write = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local seconds = tonumber(ARGV[i + 4])
  if redis.call('HGET', KEYS[3], key) == read then
    if write == '' then
      redis.call('HDEL', KEYS[3], key)
    else
      redis.call('HSET', KEYS[3], key, write)
    end
    redis.call('SADD', KEYS[4], key)
    if seconds >= 0 then
      c.session_ended({seconds, tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])})
    end
    applied = applied + 1
  end
  i = i + 6
end
c.write()
local out = {applied}
for _, n in ipairs(c.found()) do out[#out + 1] = n end
return out
