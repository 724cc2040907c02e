-- tollgate fixed window: mirrors src/algorithm/fixed_window.rs line for line.
-- KEYS[i]: counter keys (hash: t = window start µs, c = count, p = 0).
-- ARGV[1]: now (see common.lua, prepended to this script: `now`, `finish`).
-- ARGV[2i], ARGV[2i+1]: key i's count and period in µs.
-- Returns, per key: allowed (1/0), remaining, reset_after µs, retry_after µs.
-- Every value stays below 2^53, so Lua's doubles hold them exactly.

local n = #KEYS
local out = {}
local writes = {}
local all = true
for i = 1, n do
  local limit = tonumber(ARGV[2 * i])
  local period = tonumber(ARGV[2 * i + 1])
  local s = redis.call('HMGET', KEYS[i], 't', 'c')
  local st, sc = tonumber(s[1]), tonumber(s[2])
  -- A window whose end has passed is gone. A window that starts after `now` (the clock
  -- stepped back) stays: the user waits for its end, never less.
  local start, used
  if st ~= nil and sc ~= nil and now < st + period then
    start, used = st, sc
  else
    start, used = now, 0
  end
  local window_end = start + period
  local reset_after = window_end - now
  if used < limit then
    out[#out + 1] = 1
    out[#out + 1] = limit - used - 1
    out[#out + 1] = reset_after
    out[#out + 1] = 0
    writes[i] = { start, used + 1, 0, window_end }
  else
    all = false
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = reset_after
    out[#out + 1] = reset_after
  end
end

return finish(all, writes, out)
