-- tollgate: gives back a count a Redis Cluster request reserved on one hash slot when
-- another slot refused the request (ARCHITECTURE.md, "Redis Cluster": reserve, then
-- refund). Each key is changed only while it still holds the reservation, so a refund
-- never gives back more than was taken: a window that has since ended, or a key that
-- expired, is left alone (the request then stays counted there: it errs strict). The
-- key's expiry is kept (SET ... KEEPTTL).
-- KEYS[i]: the keys the reservation counted under (on one hash slot).
-- ARGV[1]: the algorithm: 1 fixed window, 2 sliding window, 3 token bucket.
-- ARGV[2]: when the reservation was decided, µs (the time its script returned).
-- ARGV[3]: now in µs, or -1 to read Redis TIME.
-- ARGV[2i+2], ARGV[2i+3]: key i's count and period in µs.
-- Returns the number of keys given back.

local algorithm = tonumber(ARGV[1])
local at = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now < 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local given = 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i + 2])
  local period = tonumber(ARGV[2 * i + 3])
  local v = redis.call('GET', KEYS[i])
  local t, c, p
  if v then
    t, c, p = string.match(v, '^(%d+):(%d+):(%d+)$')
  end
  if t then
    t, c, p = tonumber(t), tonumber(c), tonumber(p)
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
      -- GCRA: the reservation moved the arrival time on by one interval, to at least
      -- `at` + interval; moving it back is the same as never having counted — unless a
      -- later request found the bucket idle and re-based the arrival time on its own
      -- clock, which needs a time past `at` + interval: after that, nothing is given back.
      local interval = math.ceil(period / limit)
      if now <= at + interval and t - interval >= at then
        t = t - interval
        changed = true
      end
    end
    if changed then
      redis.call('SET', KEYS[i], string.format('%d:%d:%d', t, c, p), 'KEEPTTL')
      given = given + 1
    end
  end
end
return given
