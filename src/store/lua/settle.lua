-- tollgate: changes what calls counted, after the fact (algorithms.lua is prepended; it
-- defines the stored state and `settle_state`). Two uses:
-- - settling (ARCHITECTURE.md, behaviour contract item 19): a call's real cost, known once
--   it ran, is charged (delta > 0) or given back (delta < 0) under each of its keys, as
--   Algorithm::settle does;
-- - refunding a Redis Cluster reservation (ARCHITECTURE.md, "Redis Cluster": reserve,
--   then refund) that another slot refused: its cost given back, exactly or not at all.
-- Each key is changed only while it still holds the call's count: a window that has since
-- ended, or a key that expired, is left alone. The key's expiry is kept (SET ... KEEPTTL).
-- KEYS[i]: the keys (on one hash slot).
-- ARGV[1]: the algorithm: 1 fixed window, 2 sliding window, 3 token bucket.
-- ARGV[2]: now in µs, or -1 to read Redis TIME.
-- ARGV[3]: 1 for an exact refund, 0 to settle.
-- ARGV[5i-1] to ARGV[5i+3], for key i: its count, its period in µs, when the call was
-- decided (µs, the time its check's script returned), the arrival time the call's check
-- wrote (token bucket), and the delta in units.
-- Returns the number of keys changed (a refund's caller logs the others).

local algorithm = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local exact = ARGV[3] == '1'
-- On Redis's clock `now` is read here, after every request decided since the call; a
-- caller's time is its own, which says nothing of them.
local fresh = now < 0
if fresh then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local changed = 0
for i = 1, #KEYS do
  local base = 5 * i - 1
  local limit = tonumber(ARGV[base])
  local period = tonumber(ARGV[base + 1])
  local at = tonumber(ARGV[base + 2])
  local reserved = tonumber(ARGV[base + 3])
  local delta = tonumber(ARGV[base + 4])
  local v = redis.call('GET', KEYS[i])
  -- Anything but a state as algorithms.lua defines it (`STATE`, in range) is not a
  -- counter, and nothing changes there.
  local t, c, p
  if v and #v == 16 then t, c, p = struct.unpack(STATE, v) end
  if t and t < MAX_T and c <= MAX_COUNT and p <= MAX_COUNT then
    local nt, nc, np
    if exact and algorithm == 3 then
      -- GCRA: the reservation wrote the arrival time `reserved` = max(t before, at) +
      -- cost × interval. Moving the arrival time back by that much is exactly "never
      -- counted" in two cases only:
      -- - nobody counted since (t is still `reserved`): the bucket is as before, or idle
      --   from `at`, which no later request can tell apart;
      -- - the reservation queued behind a busy bucket (`reserved` - its tokens > `at`),
      --   and no request since found the bucket idle, which needs a time past
      --   `reserved` (known only on Redis's clock, read now, after them all).
      -- Otherwise (the reservation found the bucket idle and others queued behind it, so
      -- each would have started from its own time instead) nothing is given back: the
      -- request stays counted there, strict, and the caller logs it.
      local taken = math.ceil(period / limit) * -delta
      if t == reserved or (fresh and reserved - taken > at and t > reserved
          and now <= reserved) then
        nt, nc, np = t - taken, c, p
      end
    else
      nt, nc, np = settle_state(algorithm, t, c, p, at, now, limit, period, delta)
    end
    if nt and (nt ~= t or nc ~= c or np ~= p) then
      local value = struct.pack(STATE, nt, nc, np)
      if algorithm == 3 and nt > t then
        -- A bucket charged more runs out later: its expiry follows its arrival time (on
        -- the caller's clock, at least 10 s, as batch.lua writes it).
        local ttl = math.ceil((nt - now) / 1000)
        if not fresh then ttl = math.max(ttl, 10000) end
        redis.call('SET', KEYS[i], value, 'PX', math.max(ttl, 1))
      else
        redis.call('SET', KEYS[i], value, 'KEEPTTL')
      end
      changed = changed + 1
    end
  end
end
return changed
