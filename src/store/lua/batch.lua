
-- tollgate: decides a batch of requests in one call (algorithms.lua is prepended).
-- KEYS: every key the batch touches, each once.
-- ARGV[1]: now in µs since the Unix epoch, or -1 to read Redis TIME (read once).
-- ARGV[2]: the number of requests. ARGV[3]: the requests in queue order, packed in one
--   string (every argument costs Redis a parse and Lua a conversion: one string for the
--   batch is several times cheaper than numbers one by one): per request, its algorithm
--   (u8: 1 fixed window, 2 sliding window, 3 token bucket), its number of keys n (u8) and
--   its cost in units (u32), then n × (key index into KEYS: u16, count: u32, period µs:
--   f64), little-endian.
-- Each key is read once, the requests are decided in order on the states as the earlier
-- requests left them — a request of cost c allowed only if every one of its keys has c
-- units left, and then c counted under every one (all-or-nothing; a cost of 0 is allowed
-- and counts nothing) — and each changed key is written once, as
-- `SET key state PX ttl` (or KEEPTTL, when its expiry is the one it already has); the
-- state is 16 bytes (`STATE` in algorithms.lua).
-- Returns one string, little-endian (Redis turns every element of an array reply into a
-- protocol integer and the client parses each back: one string is cheaper on both
-- sides): per request a status byte, 1, or 0 when one of its keys cannot be used (a key
-- of another type or value, or a write refused when Redis is out of memory: that request
-- fails alone, and the requests after it were decided as if it had counted, which errs
-- strict); then per key: allowed (u8, 1/0), remaining (u32), reset_after µs (u64),
-- retry_after µs (u64). Last, the time decided at (u64). Needs Redis 6.2 or later
-- (SET ... GET).

local now = tonumber(ARGV[1])
-- The shortest TTL written (ms). Redis expires keys on its own clock; when the caller
-- decides on its clock instead, the two can be seconds apart (a test's manual clock), so
-- a state must not vanish in Redis time before the caller's clock reaches its expiry.
-- Keeping an expired state longer never changes a decision (it checks as no state).
local min_ttl = 10000
if now < 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
  min_ttl = 1
end

-- Library functions called per key, as locals (a global is a table lookup per call).
local pack, unpack_at = struct.pack, struct.unpack

-- Per key index: its state as t, c, p (t false when the key holds none); t as read (a
-- counter string was read: the key is a string with this script's TTL); whether it
-- cannot be used; for keys to write, when they expire (µs).
local st, sc, sp, read_t, broken, expires = {}, {}, {}, {}, {}, {}
-- One MGET reads every key. It answers nil both for a missing key and for a key of
-- another type; the second shows when the key is written (`SET ... GET` refuses a key
-- of another type), and fails the requests counted there.
local values = {}
if #KEYS > 0 then values = redis.call('MGET', unpack(KEYS)) end
for i = 1, #KEYS do
  st[i] = false
  local v = values[i]
  if v then
    local t, c, p
    if #v == 16 then t, c, p = unpack_at(STATE, v) end
    if t and t < MAX_T and c <= MAX_COUNT and p <= MAX_COUNT then
      st[i], sc[i], sp[i], read_t[i] = t, c, p, t
    else
      -- Not a counter (someone else's value under our prefix): refuse to guess.
      broken[i] = true
    end
  end
end

-- A request's pending writes, applied only when all of its keys allow.
local wi, wt, wc, wp, we = {}, {}, {}, {}, {}
-- Where each request's status sits in `out`; whether it was allowed (so counted under
-- each of its keys).
local status_at, counted = {}, {}

-- The answer's parts, joined once at the end; a request's status byte is replaced when
-- it fails.
local OK, FAILED = '\1', '\0'
local out = {}
local requests, packed = tonumber(ARGV[2]), ARGV[3]
local at = 1
-- A request's keys: index into KEYS, count, period.
local ki, kc, kp = {}, {}, {}
for r = 1, requests do
  local code, n, cost
  code, n, cost, at = unpack_at('<BBI4', packed, at)
  local algorithm = ALGORITHMS[code]
  local o = #out + 1
  status_at[r] = o
  out[o] = OK
  local usable = true
  for k = 1, n do
    ki[k], kc[k], kp[k], at = unpack_at('<HId', packed, at)
    if broken[ki[k]] then usable = false end
  end
  local all = usable
  for k = 1, n do
    local i = ki[k]
    local allowed, remaining, reset_after, retry_after, t, c, p, expires_at = false, 0, 0, 0
    if usable then
      local t0, c0, p0 = nil, nil, nil
      if st[i] then t0, c0, p0 = st[i], sc[i], sp[i] end
      allowed, remaining, reset_after, retry_after, t, c, p, expires_at =
        algorithm(t0, c0, p0, now, kc[k], kp[k], math.min(cost, kc[k] + 1))
    end
    o = o + 1
    out[o] = pack('<BI4I8I8', allowed and 1 or 0, remaining, reset_after, retry_after)
    if allowed then
      wi[k], wt[k], wc[k], wp[k], we[k] = i, t, c, p, expires_at
    else
      all = false
    end
  end
  if not usable then
    out[status_at[r]] = FAILED
  elseif all and cost > 0 then
    counted[r] = true
    for k = 1, n do
      local i = wi[k]
      st[i], sc[i], sp[i], expires[i] = wt[k], wc[k], wp[k], we[k]
    end
  end
end

-- Keys whose write Redis refused. The requests counted there fail; they are found after
-- the writes, in one more walk over the packed requests, so the decisions keep no list
-- per key and a batch whose every write fails (out of memory) costs one walk, not one
-- per key.
local refused = nil

for i, expires_at in pairs(expires) do
  local value = pack(STATE, st[i], sc[i], sp[i])
  local written
  if min_ttl == 1 and read_t[i] == st[i] then
    -- The same t: the same window as the counter read (a token bucket's t moves on every
    -- allowed request, so it never comes here), so the same expiry, already set on the
    -- key; KEEPTTL spares Redis the expiry update (a third of a write). Only on Redis's
    -- clock: deciding on the caller's clock, every write renews the floor of min_ttl in
    -- Redis time.
    written = redis.pcall('SET', KEYS[i], value, 'KEEPTTL')
  else
    local ttl = math.max(min_ttl, math.ceil((expires_at - now) / 1000))
    if values[i] then
      -- MGET read a string here, and nothing else runs while this script does.
      written = redis.pcall('SET', KEYS[i], value, 'PX', ttl)
    else
      -- Missing, or of another type (MGET says nil to both): GET makes SET refuse the
      -- second with WRONGTYPE instead of overwriting someone else's key.
      written = redis.pcall('SET', KEYS[i], value, 'PX', ttl, 'GET')
    end
  end
  if type(written) == 'table' and written.err then
    -- A key of another type, or out of memory: the requests counted here fail alone. Any
    -- other error (READONLY on a demoted primary) fails the call, so the client drops
    -- the connection.
    local code = string.match(written.err, '^(%u+)')
    if code ~= 'WRONGTYPE' and code ~= 'OOM' then return redis.error_reply(written.err) end
    refused = refused or {}
    refused[i] = true
  end
end
if refused then
  local from = 1
  for r = 1, requests do
    local _, n, index
    _, n, _, from = unpack_at('<BBI4', packed, from)
    local hit = false
    for _k = 1, n do
      index, _, _, from = unpack_at('<HId', packed, from)
      if refused[index] then hit = true end
    end
    if hit and counted[r] then out[status_at[r]] = FAILED end
  end
end
out[#out + 1] = pack('<I8', now)
return table.concat(out)
