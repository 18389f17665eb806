-- Job slot. KEYS[1] job; ARGV: tenant, now, ttl seconds.
-- Returns {outcome, tenant, created_at, priority, deadline}.
local ref = redis.call('HMGET', KEYS[1], 'tenant', 'created_at', 'priority', 'deadline')
local t = redis.call('HGET', KEYS[1], 'tenant')
if t ~= ARGV[1] then return {'missing'} end
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2],
    'cancel_requested', '1', 'used', '0')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  return {'cancelled_now', ref[1], ref[2], ref[3], ref[4]}
end
if s == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return {'cancelling', ref[1], ref[2], ref[3], ref[4]}
end
return {s, ref[1], ref[2], ref[3], ref[4]}
