-- KEYS[1] job. Undoes an admission whose publish failed.
-- Runs after settle.lua (listed, settle, QUEUED).
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
settle(KEYS[1], 0)
-- The key may be used again: this request created nothing.
local idem = redis.call('HGET', KEYS[1], 'idem_key')
if idem then
  local prev = redis.call('GET', idem)
  local id = redis.call('HGET', KEYS[1], 'id')
  if prev and string.sub(prev, 1, #id) == id then redis.call('DEL', idem) end
end
redis.call('DEL', KEYS[1])
return 1
