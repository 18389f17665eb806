-- Namespace slot. KEYS[1] queued set, KEYS[2] drained set, KEYS[3] in-flight index.
-- ARGV: now, operation, queued member, deadline, in-flight member. Operations:
-- 'leave'  the job left the queue to run or end: off the queued set, counted as drained;
-- 'enter'  the job is queued again: back on the queued set;
-- 'drop'   off the queued set, not counted (the reconciler, mirroring a record);
-- 'remove' the job is settled or was never admitted: off the queued set and the index.
local now = tonumber(ARGV[1])
local op = ARGV[2]
if op == 'enter' then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
  return 1
end
local removed = redis.call('ZREM', KEYS[1], ARGV[3])
if op == 'leave' then
  if removed == 1 then redis.call('ZADD', KEYS[2], now, ARGV[3]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
elseif op == 'remove' then
  redis.call('ZREM', KEYS[3], ARGV[5])
end
return removed
