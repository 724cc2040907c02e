-- tollgate: a key's state and the three algorithms, each mirroring its Rust function in
-- src/algorithm/ line for line on the same integers (µs since the Unix epoch), so memory
-- and Redis decide alike. Every value and product stays at or below 2^53 (configuration
-- refuses rates where a sliding window's count × period in ms exceeds it), so Lua's
-- doubles compute exactly what Rust's integers do. Prepended to batch.lua and refund.lua.
--
-- A key's state is t, c, p: t a time (window start, or the bucket's theoretical arrival
-- time), c and p counts. Stored as 16 bytes, little-endian: t u64, c and p u32, packed
-- and unpacked in one library call each (as text, "t:c:p", parsing and formatting it
-- cost Redis a fifth of a batched check). Both scripts read a state inline, not through
-- a function here: a function per key cost a batched check about 3 %.
local STATE = '<I8I4I4'
-- Every state written has t below 2^53 µs and counts at most 10^9 (a rate's count is
-- checked at start-up): 16 bytes outside that are someone else's.
local MAX_T, MAX_COUNT = 9007199254740992, 1000000000

-- fixed window: src/algorithm/fixed_window.rs
local function fixed_window(t, c, p, now, limit, period)
  -- A window whose end has passed is gone. A window that starts after `now` (the clock
  -- stepped back) stays: the user waits for its end, never less.
  local start, used
  if t ~= nil and now < t + period then
    start, used = t, c
  else
    start, used = now, 0
  end
  local window_end = start + period
  local reset_after = window_end - now
  if used < limit then
    return true, limit - used - 1, reset_after, 0, start, used + 1, 0, window_end
  end
  return false, 0, reset_after, reset_after
end

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

-- min(max(period_ms + 1 − ceil(room × period_ms / max(prev, 1)), 0), period_ms)
local function first_ms(room, prev, period_ms)
  local c = idiv_ceil(room * period_ms, math.max(prev, 1))
  local v = period_ms + 1 - c
  if v < 0 then v = 0 end
  if v > period_ms then v = period_ms end
  return v
end

-- sliding-window counter: src/algorithm/sliding_window.rs
local function sliding_window(t, c, p, now, limit, period)
  local period_ms = period / 1000
  -- The clock stepped back behind the stored window: decide as at that window's start.
  local at = now
  if t ~= nil and t > now then at = t end
  local start = at - math.fmod(at, period)
  local cur, prev = 0, 0
  if t ~= nil and t == start then
    cur, prev = c, p
  elseif t ~= nil and t + period == start then
    cur, prev = 0, c
  end
  local elapsed_ms = math.floor((at - start) / 1000)
  local weighted = idiv(prev * (period_ms - elapsed_ms), period_ms)
  local used = weighted + cur
  local reset_after = start + period - now
  if used < limit then
    return true, limit - used - 1, reset_after, 0, start, cur + 1, prev, start + 2 * period
  end
  local wait_until
  if cur < limit then
    wait_until = start + first_ms(limit - cur, prev, period_ms) * 1000
  else
    wait_until = start + period + first_ms(limit, cur, period_ms) * 1000
  end
  return false, 0, reset_after, wait_until - now
end

-- token bucket (GCRA): src/algorithm/token_bucket.rs
local function token_bucket(t, c, p, now, limit, period)
  local interval = math.ceil(period / limit)
  local capacity = interval * limit
  local tat = now
  if t ~= nil then
    tat = math.max(t, now)
  end
  local next_tat = tat + interval
  local span = next_tat - now
  if span <= capacity then
    local remaining = math.min(math.floor((capacity - span) / interval), limit - 1)
    return true, remaining, span, 0, next_tat, 0, 0, next_tat
  end
  return false, 0, tat - now, span - capacity
end

-- By the algorithm's number in a request: 1 fixed window, 2 sliding window, 3 token bucket.
local ALGORITHMS = { fixed_window, sliding_window, token_bucket }
