-- tollgate: the part every algorithm's script shares; prepended to each at build time.
-- ARGV[1]: now in µs since the Unix epoch, or -1 to read Redis TIME.
local now = tonumber(ARGV[1])
if now < 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

-- All-or-nothing: when every key allowed (`all`), writes each key's new state
-- writes[i] = {t, c, p, expires_at} with an expiry; then appends the time decided at, so
-- the caller can state resets on this clock, and returns `out`.
local function finish(all, writes, out)
  if all then
    for i = 1, #KEYS do
      local w = writes[i]
      redis.call('HSET', KEYS[i], 't', string.format('%.0f', w[1]), 'c', string.format('%.0f', w[2]), 'p', string.format('%.0f', w[3]))
      redis.call('PEXPIRE', KEYS[i], math.max(1, math.ceil((w[4] - now) / 1000)))
    end
  end
  out[#out + 1] = now
  return out
end

