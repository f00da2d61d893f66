-- Wipes one bot's cluster totals: deletes every key of them and leaves the
-- seeded marker naming the wipe, so that no replica seeds the bot from the
-- store again (which holds its rows until the writer's next flush) and every
-- replica learns of the wipe at its next sync (see sync.lua: status 4).
--
-- KEYS: 1 seeded marker, then every other key of the bot.
-- ARGV: 1 the wipe's generation (unix milliseconds).
-- Returns the number of keys deleted.
local deleted = 0
if #KEYS > 1 then
  deleted = redis.call('DEL', unpack(KEYS, 2))
end
redis.call('SET', KEYS[1], 'wiped:' .. ARGV[1])
return deleted
