-- tollgate token bucket (GCRA): mirrors src/algorithm/token_bucket.rs line for line.
-- KEYS[i]: counter keys (hash: t = theoretical arrival time µs, c = 0, p = 0).
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
  local interval = math.ceil(period / limit)
  local capacity = interval * limit
  local st = tonumber(redis.call('HGET', KEYS[i], 't'))
  local tat = now
  if st ~= nil then
    tat = math.max(st, now)
  end
  local next_tat = tat + interval
  local span = next_tat - now
  if span <= capacity then
    out[#out + 1] = 1
    out[#out + 1] = math.min(math.floor((capacity - span) / interval), limit - 1)
    out[#out + 1] = span
    out[#out + 1] = 0
    writes[i] = { next_tat, 0, 0, next_tat }
  else
    all = false
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = tat - now
    out[#out + 1] = span - capacity
  end
end

return finish(all, writes, out)
