-- Job slot. KEYS[1] job, KEYS[2] its event stream; ARGV: status, result json or '', error json
-- or '', now, ttl seconds, tokens used.
-- Writes the terminal state unless the job is terminal (or missing) already; returns 1 if
-- this call wrote it, with the job's tenant, created_at, priority, deadline.
local ref = redis.call('HMGET', KEYS[1], 'tenant', 'created_at', 'priority', 'deadline')
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return {0, ref[1], ref[2], ref[3], ref[4]} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[4], 'used', ARGV[6])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'status', ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
return {1, ref[1], ref[2], ref[3], ref[4]}
