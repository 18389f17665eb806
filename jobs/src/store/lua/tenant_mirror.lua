-- Tenant slot. KEYS[1] reservations, KEYS[2] active set, KEYS[3] tenant queued set.
-- ARGV: job id, deadline, 'queued' or 'running'.
-- Makes the tenant's sets say what the job record says of a job not yet settled: active, and
-- queued or not. A settled job (no reservation) is in neither.
local id = ARGV[1]
if redis.call('HEXISTS', KEYS[1], id) == 0 then
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[2], id)
if ARGV[3] == 'queued' then
  redis.call('ZADD', KEYS[3], ARGV[2], id)
else
  redis.call('ZREM', KEYS[3], id)
end
return 1
