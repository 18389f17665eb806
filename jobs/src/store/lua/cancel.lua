-- KEYS[1] job; ARGV: tenant, now, ttl seconds
-- Runs after settle.lua (listed, settle, QUEUED).
local t = redis.call('HGET', KEYS[1], 'tenant')
if t ~= ARGV[1] then return 'missing' end
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2], 'cancel_requested', '1')
  settle(KEYS[1], 0)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 'cancelled_now'
end
if s == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return s
