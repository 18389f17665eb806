-- Job slot. KEYS[1] job; ARGV: now, max_attempts, worker, redelivered (1 if the broker delivered
-- this message before, 0 for its first delivery), delivery (a token of this delivery, the same
-- for a worker's retries of this call).
-- Returns {status, attempt, ended now (0/1), left the queue (0/1), tenant, created_at, priority,
-- deadline}.
local ref = redis.call('HMGET', KEYS[1], 'tenant', 'created_at', 'priority', 'deadline')
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {'missing', 0, 0, 0} end
if s ~= 'queued' and s ~= 'running' then return {s, 0, 0, 0, ref[1], ref[2], ref[3], ref[4]} end
-- A running job's message delivered for the first time is a second copy of it (an idempotent
-- retry published the job again because its first publish may have died with its API
-- process): the worker that started it is alive as far as the broker knows, so this copy is
-- dropped. A redelivery means that worker died: the job runs again; so does this delivery's
-- own retry (the reply to its first call was lost).
if s == 'running' and ARGV[4] ~= '1' and redis.call('HGET', KEYS[1], 'delivery') ~= ARGV[5] then
  return {'duplicate', 0, 0, 0}
end
local left = 0
if s == 'queued' then left = 1 end
local function finish(status, code, msg)
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', ARGV[1], 'used', '0')
  if code then
    redis.call('HSET', KEYS[1], 'error', cjson.encode({code = code, message = msg}))
  end
  return {status, 0, 1, left, ref[1], ref[2], ref[3], ref[4]}
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  return finish('cancelled', nil, nil)
end
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'deadline') or '0') then
  return finish('expired', 'deadline_exceeded', 'the job deadline passed before it could run')
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'attempts', attempts - 1)
  return finish('failed', 'attempts_exhausted',
    'the job was started ' .. (attempts - 1) .. ' times without finishing')
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[3],
  'delivery', ARGV[5])
return {'running', attempts, 0, left, ref[1], ref[2], ref[3], ref[4]}
