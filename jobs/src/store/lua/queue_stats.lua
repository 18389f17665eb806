-- KEYS[1] the global queued set. ARGV: now (ms), job key prefix.
-- Returns {priority, count, oldest created_at} per class present. Jobs admitted before the
-- record carried a priority count as interactive.
local stats = {}
local order = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do
  local f = redis.call('HMGET', ARGV[2] .. id, 'priority', 'created_at')
  if f[2] then
    local p = f[1] or 'interactive'
    local created = tonumber(f[2])
    local s = stats[p]
    if not s then
      s = {0, created}
      stats[p] = s
      order[#order + 1] = p
    end
    s[1] = s[1] + 1
    if created < s[2] then s[2] = created end
  end
end
local out = {}
for _, p in ipairs(order) do out[#out + 1] = {p, stats[p][1], stats[p][2]} end
return out
