-- Job slot. KEYS[1] job. Deletes the record of an admission whose publish failed, if it is
-- still queued. Returns {deleted (0/1, -1 when there is no record), tenant, created_at, priority,
-- deadline, idempotency key}.
local ref = redis.call('HMGET', KEYS[1], 'tenant', 'created_at', 'priority', 'deadline')
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {-1} end
if s ~= 'queued' then return {0} end
local idem = redis.call('HGET', KEYS[1], 'idem_key')
redis.call('DEL', KEYS[1])
return {1, ref[1], ref[2], ref[3], ref[4], idem}
