-- Job slot. KEYS[1] job. A job given back unfinished (worker shutdown) is queued again and its
-- attempt is not counted against it. Returns {released (0/1), tenant, created_at, priority,
-- deadline}.
local ref = redis.call('HMGET', KEYS[1], 'tenant', 'created_at', 'priority', 'deadline')
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return {0, ref[1], ref[2], ref[3], ref[4]} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1')
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', math.max(attempts - 1, 0))
redis.call('HDEL', KEYS[1], 'worker')
return {1, ref[1], ref[2], ref[3], ref[4]}
