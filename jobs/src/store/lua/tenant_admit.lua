-- Tenant slot. KEYS[1] active set, KEYS[2] day counter, KEYS[3] month counter, KEYS[4]
-- idempotency record (KEYS[1] again when there is none), KEYS[5] tenant queued set, KEYS[6]
-- reservations.
-- ARGV: now, max_active (-1 = unlimited), day limit, month limit, reserve, idempotency
-- fingerprint ('' = none), idempotency ttl, max queued for the tenant, job id, deadline,
-- reservation record ({reserve}|{day}|{month}, then |{idempotency record} when there is one).
-- Checks and reserves everything of the tenant's at once; a refusal changes nothing.
local now = tonumber(ARGV[1])
-- A retried call (the client did not see the first reply) reserves nothing more.
if redis.call('HEXISTS', KEYS[6], ARGV[9]) == 1 then return {'ok', 0, 0, ''} end
local fingerprint = ARGV[6]
if fingerprint ~= '' then
  local prev = redis.call('GET', KEYS[4])
  if prev then
    local sep = string.find(prev, '|', 1, true)
    if string.sub(prev, sep + 1) ~= fingerprint then return {'idempotency_mismatch', 0, 0, ''} end
    return {'duplicate', 0, 0, string.sub(prev, 1, sep - 1)}
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local queued = redis.call('ZCARD', KEYS[5])
local max_queued = tonumber(ARGV[8])
if max_queued >= 0 and queued >= max_queued then
  return {'tenant_queue_full', queued, max_queued, ''}
end
-- Jobs past their deadline have stopped or will stop at their next token: they no longer
-- count, even before the reconciler settles them.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max_active = tonumber(ARGV[2])
local active = redis.call('ZCARD', KEYS[1])
if max_active >= 0 and active >= max_active then return {'concurrency', active, max_active, ''} end
local reserve = tonumber(ARGV[5])
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4])}
local names = {'day', 'month'}
for i = 1, 2 do
  local used = tonumber(redis.call('GET', KEYS[1 + i]) or '0')
  if limits[i] >= 0 and used + reserve > limits[i] then
    return {'quota_' .. names[i], used, limits[i], ''}
  end
end
local id = ARGV[9]
local deadline = tonumber(ARGV[10])
redis.call('INCRBY', KEYS[2], reserve)
redis.call('EXPIRE', KEYS[2], 172800)
redis.call('INCRBY', KEYS[3], reserve)
redis.call('EXPIRE', KEYS[3], 3024000)
redis.call('ZADD', KEYS[1], deadline, id)
redis.call('ZADD', KEYS[5], deadline, id)
redis.call('HSET', KEYS[6], id, ARGV[11])
if fingerprint ~= '' then
  redis.call('SET', KEYS[4], id .. '|' .. fingerprint, 'EX', tonumber(ARGV[7]))
end
return {'ok', 0, 0, ''}
