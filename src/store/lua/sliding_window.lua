-- tollgate sliding-window counter: mirrors src/algorithm/sliding_window.rs line for line.
-- KEYS[i]: counter keys (hash: t = aligned window start µs, c = current count,
-- p = previous window's count).
-- ARGV[1]: now (see common.lua, prepended to this script: `now`, `finish`).
-- ARGV[2i], ARGV[2i+1]: key i's count and period in µs (a whole number of seconds).
-- Returns, per key: allowed (1/0), remaining, reset_after µs, retry_after µs.
-- Every value and product stays at or below 2^53 (configuration refuses rates where
-- count × period in ms exceeds it), so Lua's doubles compute exactly what Rust's
-- integers do; idiv/idiv_ceil stand for Rust's integer divisions of large products.

-- floor(a / b) for integers a >= 0, b > 0, exactly: a double quotient near a large
-- integer can round onto it, so the floor is corrected by one step either way (the
-- products stay exact: a and q × b are at most 2^53).
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- ceil(a / b), exactly.
local function idiv_ceil(a, b)
  local q = idiv(a, b)
  if q * b < a then
    q = q + 1
  end
  return q
end

-- floor(prev × left_ms / period_ms)
local function weigh(prev, left_ms, period_ms)
  return idiv(prev * left_ms, period_ms)
end

-- min(max(period_ms + 1 − ceil(room × period_ms / max(prev, 1)), 0), period_ms)
local function first_ms(room, prev, period_ms)
  local c = idiv_ceil(room * period_ms, math.max(prev, 1))
  local v = period_ms + 1 - c
  if v < 0 then v = 0 end
  if v > period_ms then v = period_ms end
  return v
end

local n = #KEYS
local out = {}
local writes = {}
local all = true
for i = 1, n do
  local limit = tonumber(ARGV[2 * i])
  local period = tonumber(ARGV[2 * i + 1])
  local period_ms = period / 1000
  local s = redis.call('HMGET', KEYS[i], 't', 'c', 'p')
  local st, sc, sp = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
  if sc == nil or sp == nil then st = nil end
  -- The clock stepped back behind the stored window: decide as at that window's start.
  local at = now
  if st ~= nil and st > now then at = st end
  local start = at - math.fmod(at, period)
  local cur, prev = 0, 0
  if st ~= nil and st == start then
    cur, prev = sc, sp
  elseif st ~= nil and st + period == start then
    cur, prev = 0, sc
  end
  local elapsed_ms = math.floor((at - start) / 1000)
  local weighted = weigh(prev, period_ms - elapsed_ms, period_ms)
  local used = weighted + cur
  local reset_after = start + period - now
  if used < limit then
    out[#out + 1] = 1
    out[#out + 1] = limit - used - 1
    out[#out + 1] = reset_after
    out[#out + 1] = 0
    writes[i] = { start, cur + 1, prev, start + 2 * period }
  else
    all = false
    local wait_until
    if cur < limit then
      wait_until = start + first_ms(limit - cur, prev, period_ms) * 1000
    else
      wait_until = start + period + first_ms(limit, cur, period_ms) * 1000
    end
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = reset_after
    out[#out + 1] = wait_until - now
  end
end

return finish(all, writes, out)
