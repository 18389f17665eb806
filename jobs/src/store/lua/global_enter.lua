-- Namespace slot. KEYS[1] queued set, KEYS[2] drained set, KEYS[3] in-flight index.
-- ARGV: now, max queued (-1 = unlimited), queued member, deadline, in-flight member, when the
-- reconciler first looks at it.
-- Takes a place in the namespace's queue (the global cap) and enters the job in the in-flight
-- index, before anything of the tenant's is reserved. Retry-After comes from the measured drain
-- rate (jobs that left the queue in the last minute).
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cap = tonumber(ARGV[2])
local queued = redis.call('ZCARD', KEYS[1])
if cap >= 0 and queued >= cap then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  local drained = redis.call('ZCARD', KEYS[2])
  local retry = 30
  if drained > 0 then
    retry = math.min(300, math.max(1, math.ceil((queued - cap + 1) * 60 / drained)))
  end
  return {'queue_full', queued, cap, tostring(retry)}
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
return {'ok', 0, 0, ''}
