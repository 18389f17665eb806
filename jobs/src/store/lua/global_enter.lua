-- Namespace slot. KEYS[1] queued set, KEYS[2] in-flight index.
-- ARGV: now, max queued (-1 = unlimited), queued member, deadline, in-flight member, when the
-- reconciler first looks at it.
-- Takes a place in the namespace's queue (the global cap) and enters the job in the in-flight
-- index, before anything of the tenant's is reserved. Returns {'ok', 0, 0}, or {'queue_full',
-- queued, cap} (the caller computes Retry-After from the drain record).
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cap = tonumber(ARGV[2])
local queued = redis.call('ZCARD', KEYS[1])
if cap >= 0 and queued >= cap then return {'queue_full', queued, cap} end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
return {'ok', 0, 0}
