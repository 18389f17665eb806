-- Namespace slot. KEYS[1] in-flight index; ARGV: now, next look, most entries.
-- Claims the entries due for a look (score <= now) by pushing them to the next look, so that
-- concurrent reconcilers share the work; returns them.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return due
