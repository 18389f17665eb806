-- Job slot. KEYS[1] job; ARGV: tenant, now, ttl seconds, error json.
-- For the reconciler, about a job whose admission did not finish: if there is no record, writes
-- a terminal one (so a late admission cannot write it), marked `fenced` (so a retry with the
-- admission's idempotency key, which names this job until the settlement frees it, is told to
-- come back rather than given this failure), and returns 1.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'status', 'failed', 'created_at', ARGV[2],
  'finished_at', ARGV[2], 'attempts', '0', 'used', '0', 'error', ARGV[4], 'fenced', '1')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
