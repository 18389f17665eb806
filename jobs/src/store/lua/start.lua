-- KEYS[1] job; ARGV: now, max_attempts, worker
-- Runs after settle.lua (listed, settle, QUEUED).
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {'missing', 0, 0} end
if s ~= 'queued' and s ~= 'running' then return {s, 0, 0} end
local now = tonumber(ARGV[1])
if s == 'queued' then
  -- The job leaves the queue (to run, or to a terminal state): count it for the drain rate.
  listed(KEYS[1], QUEUED)
  local drain = redis.call('HGET', KEYS[1], 'drain')
  if drain then
    local bucket = drain .. math.floor(now / 1000)
    redis.call('INCR', bucket)
    redis.call('EXPIRE', bucket, 120)
  end
end
local function finish(status, code, msg)
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', ARGV[1])
  settle(KEYS[1], 0)
  if code then
    redis.call('HSET', KEYS[1], 'error', cjson.encode({code = code, message = msg}))
  end
  return {status, 0, 1}
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  return finish('cancelled', nil, nil)
end
if now > tonumber(redis.call('HGET', KEYS[1], 'deadline') or '0') then
  return finish('expired', 'deadline_exceeded', 'the job deadline passed before it could run')
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'attempts', attempts - 1)
  return finish('failed', 'attempts_exhausted',
    'the job was started ' .. (attempts - 1) .. ' times without finishing')
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[3])
return {'running', attempts, 0}
