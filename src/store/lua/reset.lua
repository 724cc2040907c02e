-- tollgate: forgets what was counted under some keys (ARCHITECTURE.md, behaviour contract
-- item 20: reset), so that their next check starts afresh.
-- KEYS[i]: the keys (on one hash slot).
-- Only a counter is deleted (a 16-byte string, as algorithms.lua stores it): anything else
-- under the prefix is not tollgate's and is left alone.
-- Returns the number of keys deleted.

local deleted = 0
for i = 1, #KEYS do
  local key = KEYS[i]
  if redis.call('TYPE', key).ok == 'string' and redis.call('STRLEN', key) == 16 then
    deleted = deleted + redis.call('DEL', key)
  end
end
return deleted
