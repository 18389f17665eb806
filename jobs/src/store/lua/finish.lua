-- KEYS[1] job, KEYS[2] its event stream; ARGV: status, result json or '', error json or '', now,
-- ttl seconds, tokens used
-- Runs after settle.lua (listed, settle, QUEUED).
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[4])
settle(KEYS[1], tonumber(ARGV[6]))
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'status', ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
return 1
