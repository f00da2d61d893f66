-- Unmarks the sketches the store now holds, unless a sync changed one
-- since it was read: that one stays marked for the next write.
--
-- KEYS: 1 the dirty-sketch set, then the sketches written.
-- ARGV: what was written, one per sketch, in order (exact_stored in
--       exact.lua, which is prepended).
local cleaned = 0
for i = 2, #KEYS do
  if exact_stored(KEYS[i]) == ARGV[i - 1] then
    redis.call('SREM', KEYS[1], KEYS[i])
    cleaned = cleaned + 1
  end
end
return cleaned
