-- tollgate: gives back a count a Redis Cluster request reserved on one hash slot when
-- another slot refused the request (ARCHITECTURE.md, "Redis Cluster": reserve, then
-- refund). Each key is changed only while it still holds the reservation, so a refund
-- never gives back more than was taken: a window that has since ended, or a key that
-- expired, is left alone (the request then stays counted there: it errs strict).
-- KEYS[i]: the keys the reservation counted under (on one hash slot).
-- ARGV[1]: the algorithm: fw, sw or tb.
-- ARGV[2]: when the reservation was decided, µs (the time its script returned).
-- ARGV[2i+1], ARGV[2i+2]: key i's count and period in µs.
-- Returns the number of keys given back.

local algorithm = ARGV[1]
local at = tonumber(ARGV[2])
local given = 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i + 1])
  local period = tonumber(ARGV[2 * i + 2])
  if algorithm == 'fw' then
    -- The reservation counted in the window holding `at`; windows of a key never overlap.
    local s = redis.call('HMGET', KEYS[i], 't', 'c')
    local st, sc = tonumber(s[1]), tonumber(s[2])
    if st ~= nil and sc ~= nil and sc > 0 and st <= at and at < st + period then
      redis.call('HSET', KEYS[i], 'c', string.format('%.0f', sc - 1))
      given = given + 1
    end
  elseif algorithm == 'sw' then
    -- The reservation counted in the aligned window holding `at`: still the current one
    -- (`c`), or the previous one (`p`) once the next window has begun.
    local start = at - math.fmod(at, period)
    local s = redis.call('HMGET', KEYS[i], 't', 'c', 'p')
    local st, sc, sp = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
    if st ~= nil and sc ~= nil and sp ~= nil then
      if st == start and sc > 0 then
        redis.call('HSET', KEYS[i], 'c', string.format('%.0f', sc - 1))
        given = given + 1
      elseif st == start + period and sp > 0 then
        redis.call('HSET', KEYS[i], 'p', string.format('%.0f', sp - 1))
        given = given + 1
      end
    end
  else
    -- GCRA: the reservation moved the arrival time on by one interval, to at least
    -- `at` + interval; moving it back is the same as never having counted.
    local interval = math.ceil(period / limit)
    local st = tonumber(redis.call('HGET', KEYS[i], 't'))
    if st ~= nil and st - interval >= at then
      redis.call('HSET', KEYS[i], 't', string.format('%.0f', st - interval))
      given = given + 1
    end
  end
end
return given
