-- KEYS[1] job. A job given back unfinished (worker shutdown) is queued again and its attempt
-- is not counted against it.
-- Runs after settle.lua (listed, settle, QUEUED).
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1')
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', math.max(attempts - 1, 0))
redis.call('HDEL', KEYS[1], 'worker')
listed(KEYS[1], QUEUED, tonumber(redis.call('HGET', KEYS[1], 'deadline') or '0'))
return 1
