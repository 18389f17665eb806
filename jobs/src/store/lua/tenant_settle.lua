-- Tenant slot. KEYS[1] reservations, KEYS[2] active set, KEYS[3] tenant queued set, KEYS[4]
-- day counter, KEYS[5] month counter, KEYS[6] idempotency record to drop if it names the job
-- (KEYS[1] again when there is none).
-- ARGV: job id, tokens used, day, month, drop idempotency (0/1).
-- Settles a job that ended: refunds the unused part of its reservation to the counters it came
-- from and takes it off the tenant's sets. The reservation's field goes with it, so a second
-- call refunds nothing. Returns 1 if this call settled it, 0 if it was settled before, -1 if
-- the counters named are not those it reserved on (nothing changed).
local id = ARGV[1]
if ARGV[5] == '1' then
  local prev = redis.call('GET', KEYS[6])
  if prev and string.sub(prev, 1, #id + 1) == id .. '|' then redis.call('DEL', KEYS[6]) end
end
local r = redis.call('HGET', KEYS[1], id)
if not r then
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  return 0
end
-- {reserve}|{day}|{month}, then |{idempotency record} when the admission had one.
local a = string.find(r, '|', 1, true)
local b = string.find(r, '|', a + 1, true)
local c = string.find(r, '|', b + 1, true)
local month = c and string.sub(r, b + 1, c - 1) or string.sub(r, b + 1)
if string.sub(r, a + 1, b - 1) ~= ARGV[3] or month ~= ARGV[4] then return -1 end
redis.call('HDEL', KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[3], id)
local refund = tonumber(string.sub(r, 1, a - 1)) - tonumber(ARGV[2])
if refund > 0 then
  for i = 4, 5 do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('DECRBY', KEYS[i], refund) end
  end
end
return 1
