-- The user book's rule, as src/metrics/users.rs `apply_run` has it: what
-- one run of a user's events (one local day, no gap over the session gap)
-- does to the user's entry. Prepended to the scripts that merge runs into
-- `bm:{bot}:book`; a Rust test runs this and `apply_run` on the same inputs
-- through a real Redis, so the two cannot drift apart.
--
-- An entry is 20 bytes, '<HHIIIHH': first day, last day, days mask (bit i:
-- active on first day + i, i < 31), last event ts, open session's start,
-- its messages, flags (2: the open session was counted as ended).
local FIRST_DAYS = 31
local DAYS_MASK = 0x7FFFFFFF
local ENDED = 2
local U32 = 4294967295

local function book_unpack(v)
  local fd, ld, days, last, start, msgs, flags = struct.unpack('<HHIIIHH', v)
  return {fd = fd, ld = ld, days = days, last = last, start = start, msgs = msgs, flags = flags}
end

local function book_pack(e)
  return struct.pack('<HHIIIHH', e.fd, e.ld, e.days, e.last, e.start, e.msgs, e.flags)
end

-- 31-bit masks stay positive in Lua BitOp's signed 32-bit arithmetic.
local function shl(x, n)
  if n >= 32 then return 0 end
  return bit.band(bit.lshift(x, n), DAYS_MASK)
end

-- Applies run (day, s, t, m) to entry e (nil: a new user) with gap `gap`.
-- Returns the entry, whether the user is new, whether the run made them
-- returning, and the ended session as {seconds, messages, last ts} or nil.
local function book_apply(e, day, s, t, m, gap)
  if e == nil then
    return {fd = day, ld = day, days = 1, last = t, start = s, msgs = m, flags = 0}, true, false, nil
  end
  local returning, ended = false, nil
  if day > e.ld then
    returning = day > e.fd
    e.ld = day
  end
  if day < e.fd then
    local shift = e.fd - day
    e.days = bit.band(bit.bor(shl(e.days, shift), 1), DAYS_MASK)
    e.fd = day
  else
    local offset = day - e.fd
    if offset < FIRST_DAYS then e.days = bit.bor(e.days, bit.lshift(1, offset)) end
  end
  if s > math.min(e.last + gap, U32) then
    if bit.band(e.flags, ENDED) == 0 then
      ended = {e.last - e.start, e.msgs, e.last}
    end
    e.flags = bit.band(e.flags, bit.bnot(ENDED))
    e.start, e.msgs, e.last = s, m, t
  elseif t >= math.max(e.start - gap, 0) then
    e.start = math.min(e.start, s)
    e.last = math.max(e.last, t)
    e.msgs = math.min(e.msgs + m, 65535)
  end
  return e, false, returning, ended
end

-- What the rule finds is counted into the bot's series hash and "today"
-- hash. Reads its arguments from ARGV[i] onward: the series fields of
-- bot_users_new_total and bot_sessions_total; for each of the two session
-- histograms (duration, messages): n bounds, the n bounds, n + 1 bucket
-- fields (the last +Inf), the sum and count fields; n days, then (local
-- day, its first unix second, YYYY-MM-DD) ascending, the last one past the
-- days counted (the script places a session's last event in its local day
-- without knowing the time zone). Returns the counter and the next i.
local function book_counting(series_key, today_key, i)
  local f_new, f_sessions = ARGV[i], ARGV[i + 1]
  i = i + 2
  local function histogram()
    local n = tonumber(ARGV[i])
    local h = {bounds = {}, fields = {}}
    for k = 1, n do h.bounds[k] = tonumber(ARGV[i + k]) end
    for k = 1, n + 1 do h.fields[k] = ARGV[i + n + k] end
    h.sum, h.count = ARGV[i + 2 * n + 2], ARGV[i + 2 * n + 3]
    i = i + 2 * n + 4
    return h
  end
  local duration = histogram()
  local messages = histogram()
  local days = {}
  for k = 1, tonumber(ARGV[i]) do
    days[k] = {tonumber(ARGV[i + 3 * k - 2]), tonumber(ARGV[i + 3 * k - 1]), ARGV[i + 3 * k]}
  end
  i = i + 1 + 3 * #days
  local function date_of_day(day)
    for k = 1, #days - 1 do
      if days[k][1] == day then return days[k][3] end
    end
  end
  local function date_of_ts(ts)
    for k = 1, #days - 1 do
      if ts >= days[k][2] and ts < days[k + 1][2] then return days[k][3] end
    end
  end
  -- Additions are summed here and written once each at the end.
  local series, today = {}, {}
  local function add(t, field, n) t[field] = (t[field] or 0) + n end
  local function add_today(date, name, n)
    if date then add(today, date .. ':' .. name, n) end
  end
  local function observe(h, v)
    for k = 1, #h.bounds do
      if v <= h.bounds[k] then add(series, h.fields[k], 1) end
    end
    add(series, h.fields[#h.fields], 1)
    add(series, h.sum, v)
    add(series, h.count, 1)
  end
  local c = {new = 0, sessions = {}}
  function c.new_user(day)
    c.new = c.new + 1
    add(series, f_new, 1)
    add_today(date_of_day(day), 'users_new', 1)
  end
  function c.returning(day)
    add_today(date_of_day(day), 'users_returning', 1)
  end
  -- s: {seconds, messages, last ts}
  function c.session_ended(s)
    c.sessions[#c.sessions + 1] = s[1]
    c.sessions[#c.sessions + 1] = s[2]
    add(series, f_sessions, 1)
    observe(duration, s[1])
    observe(messages, s[2])
    local date = date_of_ts(s[3])
    add_today(date, 'sessions', 1)
    add_today(date, 'session_messages', s[2])
    local bucket = #duration.bounds
    for k = 1, #duration.bounds do
      if s[1] <= duration.bounds[k] then bucket = k - 1; break end
    end
    add_today(date, 'session_seconds.' .. bucket, 1)
  end
  function c.write()
    for field, n in pairs(series) do redis.call('HINCRBYFLOAT', series_key, field, n) end
    for field, n in pairs(today) do redis.call('HINCRBY', today_key, field, n) end
  end
  -- What this call found, for the replica's own /metrics: new users, then
  -- (seconds, messages) per ended session.
  function c.found()
    local out = {c.new}
    for _, n in ipairs(c.sessions) do out[#out + 1] = n end
    return out
  end
  return c, i
end

local function book_check_types(book, changed)
  -- What can fail on a damaged key fails before anything is written.
  for _, key in ipairs({book, changed}) do
    local t = redis.call('TYPE', key).ok
    if t ~= 'none' and t ~= (key == book and 'hash' or 'set') then
      error('WRONGTYPE ' .. key .. ' holds a ' .. t)
    end
  end
end

-- Merges one replica's book section, ARGV[i] onward, into the bot's book;
-- runs inside sync.lua, under the batch's mark, so a resent batch is
-- skipped whole. Counts into sync.lua's KEYS[1] (series) and KEYS[4]
-- (today).
--
-- ARGV from i: book key index, changed-users set key index, gap seconds,
-- the counting section (book_counting); n erased users, their 8-byte keys;
-- n users, then per user one argument: its 8-byte key and its runs in
-- start order, 12 bytes each ('<HIIH': day, start, end, messages): binary,
-- a quarter of the bytes of decimal arguments. Returns what it found (c.found()).
local function book_merge(i)
  local book, changed = KEYS[tonumber(ARGV[i])], KEYS[tonumber(ARGV[i + 1])]
  book_check_types(book, changed)
  local gap = tonumber(ARGV[i + 2])
  local c
  c, i = book_counting(KEYS[1], KEYS[4], i + 3)
  for _ = 1, tonumber(ARGV[i]) do
    i = i + 1
    redis.call('HDEL', book, ARGV[i])
    redis.call('SADD', changed, ARGV[i])
  end
  i = i + 1
  local users = tonumber(ARGV[i])
  for _ = 1, users do
    i = i + 1
    local user = ARGV[i]
    local key = string.sub(user, 1, 8)
    local held = redis.call('HGET', book, key)
    -- A value of another length is no entry (damaged): the user starts again.
    local e = nil
    if held and #held == 20 then e = book_unpack(held) end
    for at = 9, #user - 11, 12 do
      local day, s, t, m = struct.unpack('<HIIH', user, at)
      local new, returning, ended
      e, new, returning, ended = book_apply(e, day, s, t, m, gap)
      if new then c.new_user(day) end
      if returning then c.returning(day) end
      if ended then c.session_ended(ended) end
    end
    if e then
      redis.call('HSET', book, key, book_pack(e))
      redis.call('SADD', changed, key)
    end
  end
  c.write()
  return c.found()
end
