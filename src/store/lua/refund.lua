-- tollgate: gives back a count a Redis Cluster request reserved on one hash slot when
-- another slot refused the request (ARCHITECTURE.md, "Redis Cluster": reserve, then
-- refund). Each key is changed only while it still holds the reservation and taking it
-- out is exact, so a refund never gives back more than was taken: a window that has
-- since ended, a key that expired, or a token bucket others have since queued behind
-- is left alone (the request then stays counted there: it errs strict). The key's expiry
-- is kept (SET ... KEEPTTL). algorithms.lua is prepended (it defines the stored state).
-- KEYS[i]: the keys the reservation counted under (on one hash slot).
-- ARGV[1]: the algorithm: 1 fixed window, 2 sliding window, 3 token bucket.
-- ARGV[2]: when the reservation was decided, µs (the time its script returned).
-- ARGV[3]: now in µs, or -1 to read Redis TIME.
-- ARGV[3i+1], ARGV[3i+2], ARGV[3i+3]: key i's count, period in µs, and (token bucket)
-- the arrival time the reservation wrote, µs.
-- Returns the number of keys given back (the caller logs the others).

local algorithm = tonumber(ARGV[1])
local at = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
-- On Redis's clock `now` is read here, after every request decided since the
-- reservation; a caller's time is the reservation's own, which says nothing of them.
local fresh = now < 0
if fresh then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local given = 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 * i + 1])
  local period = tonumber(ARGV[3 * i + 2])
  local reserved = tonumber(ARGV[3 * i + 3])
  local v = redis.call('GET', KEYS[i])
  -- Anything but a state as algorithms.lua defines it (`STATE`, in range) is not a
  -- counter, and nothing is given back there.
  local t, c, p
  if v and #v == 16 then t, c, p = struct.unpack(STATE, v) end
  if t and t < MAX_T and c <= MAX_COUNT and p <= MAX_COUNT then
    local changed = false
    if algorithm == 1 then
      -- The reservation counted in the window holding `at`; a key's windows never overlap.
      if c > 0 and t <= at and at < t + period then
        c = c - 1
        changed = true
      end
    elseif algorithm == 2 then
      -- It counted in the aligned window holding `at`: still the current one (c), or the
      -- previous one (p) once the next window has begun.
      local start = at - math.fmod(at, period)
      if t == start and c > 0 then
        c = c - 1
        changed = true
      elseif t == start + period and p > 0 then
        p = p - 1
        changed = true
      end
    else
      -- GCRA: the reservation wrote the arrival time `reserved` = max(t before, at) +
      -- interval. Moving the arrival time back one interval is exactly "never counted"
      -- in two cases only:
      -- - nobody counted since (t is still `reserved`): the bucket is as before, or idle
      --   from `at`, which no later request can tell apart;
      -- - the reservation queued behind a busy bucket (`reserved` - interval > `at`), and
      --   no request since found the bucket idle, which needs a time past `reserved`
      --   (known only on Redis's clock, read now, after them all).
      -- Otherwise (the reservation found the bucket idle and others queued behind it, so
      -- each would have started from its own time instead) nothing is given back: the
      -- request stays counted there, strict, and the caller logs it.
      local interval = math.ceil(period / limit)
      if t == reserved or (fresh and reserved - interval > at and t > reserved
          and now <= reserved) then
        t = t - interval
        changed = true
      end
    end
    if changed then
      redis.call('SET', KEYS[i], struct.pack(STATE, t, c, p), 'KEEPTTL')
      given = given + 1
    end
  end
end
return given
