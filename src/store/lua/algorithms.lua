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

-- Each algorithm decides a call of `cost` units (Algorithm::check clamps a cost above
-- the limit to one more than the limit, which never fits; the caller clamps here too).

-- fixed window: src/algorithm/fixed_window.rs
local function fixed_window(t, c, p, now, limit, period, cost)
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
  if cost == 0 or used + cost <= limit then
    return true, math.max(limit - used - cost, 0), reset_after, 0, start, used + cost, 0, window_end
  end
  return false, math.max(limit - used, 0), reset_after, reset_after
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
local function sliding_window(t, c, p, now, limit, period, cost)
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
  if cost == 0 or used + cost <= limit then
    return true, math.max(limit - used - cost, 0), reset_after, 0, start, cur + cost, prev,
      start + 2 * period
  end
  local wait_until
  if cur + cost <= limit then
    wait_until = start + first_ms(limit - cur - cost + 1, prev, period_ms) * 1000
  else
    wait_until = start + period + first_ms(limit - cost + 1, cur, period_ms) * 1000
  end
  return false, math.max(limit - used, 0), reset_after, math.max(wait_until - now, 1)
end

-- token bucket (GCRA): src/algorithm/token_bucket.rs
local function token_bucket(t, c, p, now, limit, period, cost)
  local interval = math.ceil(period / limit)
  local capacity = interval * limit
  local tat = now
  if t ~= nil then
    tat = math.max(t, now)
  end
  local next_tat = tat + interval * cost
  local span = next_tat - now
  if cost == 0 or span <= capacity then
    local remaining = math.min(math.floor(math.max(capacity - span, 0) / interval), limit - cost)
    return true, remaining, span, 0, next_tat, 0, 0, next_tat
  end
  return false, math.floor(math.max(capacity - (tat - now), 0) / interval), tat - now,
    span - capacity
end

-- By the algorithm's number in a request: 1 fixed window, 2 sliding window, 3 token bucket.
local ALGORITHMS = { fixed_window, sliding_window, token_bucket }

-- Settling (Algorithm::settle and its three functions): a call counted at `at` is charged
-- `delta` units more, or given -delta back, at `now`.

-- `count` changed by `delta`, within 0 and `cap`.
local function adjusted(count, delta, cap)
  local v = count + delta
  if v < 0 then v = 0 end
  if v > cap then v = cap end
  return v
end

-- Algorithm::cap: the most units a window may hold once in debt.
local function units_cap(algorithm, limit, period)
  local cap = math.min(2 * limit, MAX_COUNT)
  if algorithm == 2 then cap = math.min(cap, idiv(MAX_T, period / 1000)) end
  return cap
end

-- The new t, c, p, or nil when the key no longer holds the call's count.
local function settle_state(algorithm, t, c, p, at, now, limit, period, delta)
  if algorithm == 1 then
    if t <= at and at < t + period then
      return t, adjusted(c, delta, units_cap(1, limit, period)), p
    end
  elseif algorithm == 2 then
    local start = at - math.fmod(at, period)
    local cap = units_cap(2, limit, period)
    if t == start then
      return t, adjusted(c, delta, cap), p
    elseif t == start + period then
      return t, c, adjusted(p, delta, cap)
    end
  else
    local interval = math.ceil(period / limit)
    local capacity = interval * limit
    local tokens = math.min(math.abs(delta), 2 * limit)
    if delta >= 0 then
      local tat = math.min(math.max(t, now) + interval * tokens, now + 2 * capacity)
      return math.max(tat, t), c, p
    end
    return math.max(t - interval * tokens, 0), c, p
  end
  return nil
end
