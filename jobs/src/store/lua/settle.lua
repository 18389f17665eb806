local QUEUED = {'queued_key', 'gqueued_key'}
local function listed(job, fields, score)
  local id = redis.call('HGET', job, 'id') or ''
  for _, field in ipairs(fields) do
    local set = redis.call('HGET', job, field)
    if set then
      if score then redis.call('ZADD', set, score, id) else redis.call('ZREM', set, id) end
    end
  end
end
local function settle(job, used)
  if redis.call('HGET', job, 'settled') ~= '0' then return end
  redis.call('HSET', job, 'settled', '1')
  local refund = tonumber(redis.call('HGET', job, 'reserved') or '0') - used
  if refund > 0 then
    for _, field in ipairs({'qday', 'qmonth'}) do
      local counter = redis.call('HGET', job, field)
      if counter and redis.call('EXISTS', counter) == 1 then
        redis.call('DECRBY', counter, refund)
      end
    end
  end
  listed(job, {'active_key', QUEUED[1], QUEUED[2]})
end
