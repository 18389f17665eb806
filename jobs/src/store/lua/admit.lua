-- KEYS[1] job, KEYS[2] tenant active set, KEYS[3] day counter, KEYS[4] month counter,
-- KEYS[5] idempotency record (KEYS[1] again when there is none), KEYS[6] queued set,
-- KEYS[7] tenant queued set.
-- ARGV: now, max_active (-1 = unlimited), day limit, month limit, reserve, job ttl,
-- idempotency fingerprint ('' = none), idempotency ttl, max queued, max queued for the tenant
-- (-1 = unlimited), drain counter prefix, then the job's field/value pairs.
local now = tonumber(ARGV[1])
local fingerprint = ARGV[7]
if fingerprint ~= '' then
  local prev = redis.call('GET', KEYS[5])
  if prev then
    local sep = string.find(prev, '|', 1, true)
    if string.sub(prev, sep + 1) ~= fingerprint then return {'idempotency_mismatch', 0, 0, ''} end
    return {'duplicate', 0, 0, string.sub(prev, 1, sep - 1)}
  end
end
-- Backpressure: queued jobs, globally and per tenant. Retry-After from the measured drain
-- rate (jobs that left the queue per second over the last minute).
local function retry_after(excess)
  local sec = math.floor(now / 1000)
  local drained = 0
  for i = 0, 59 do drained = drained + tonumber(redis.call('GET', ARGV[11] .. (sec - i)) or '0') end
  if drained == 0 then return 30 end
  return math.min(300, math.max(1, math.ceil(excess * 60 / drained)))
end
local caps = {{KEYS[6], tonumber(ARGV[9]), 'queue_full'}, {KEYS[7], tonumber(ARGV[10]), 'tenant_queue_full'}}
for _, c in ipairs(caps) do
  redis.call('ZREMRANGEBYSCORE', c[1], '-inf', now)
  local queued = redis.call('ZCARD', c[1])
  if c[2] >= 0 and queued >= c[2] then
    return {c[3], queued, c[2], tostring(retry_after(queued - c[2] + 1))}
  end
end
-- Jobs past their deadline have stopped or will stop at their next token: they no longer
-- count, even if their settlement was lost with a record that expired.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local max_active = tonumber(ARGV[2])
local active = redis.call('ZCARD', KEYS[2])
if max_active >= 0 and active >= max_active then return {'concurrency', active, max_active, ''} end
local reserve = tonumber(ARGV[5])
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4])}
local names = {'day', 'month'}
for i = 1, 2 do
  local used = tonumber(redis.call('GET', KEYS[2 + i]) or '0')
  if limits[i] >= 0 and used + reserve > limits[i] then
    return {'quota_' .. names[i], used, limits[i], ''}
  end
end
local fields = {}
for i = 12, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline'))
redis.call('ZADD', KEYS[2], deadline, redis.call('HGET', KEYS[1], 'id'))
redis.call('ZADD', KEYS[6], deadline, redis.call('HGET', KEYS[1], 'id'))
redis.call('ZADD', KEYS[7], deadline, redis.call('HGET', KEYS[1], 'id'))
redis.call('INCRBY', KEYS[3], reserve)
redis.call('EXPIRE', KEYS[3], 172800)
redis.call('INCRBY', KEYS[4], reserve)
redis.call('EXPIRE', KEYS[4], 3024000)
redis.call('HSET', KEYS[1], 'reserved', reserve, 'qday', KEYS[3], 'qmonth', KEYS[4],
  'active_key', KEYS[2], 'gqueued_key', KEYS[6], 'queued_key', KEYS[7], 'drain', ARGV[11],
  'settled', '0')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
if fingerprint ~= '' then
  local id = redis.call('HGET', KEYS[1], 'id')
  redis.call('SET', KEYS[5], id .. '|' .. fingerprint, 'EX', tonumber(ARGV[8]))
  redis.call('HSET', KEYS[1], 'idem_key', KEYS[5])
end
return {'ok', 0, 0, ''}
