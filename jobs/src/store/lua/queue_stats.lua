-- Namespace slot. KEYS[1] the queued set (members {priority}|{created_at}|{id}); ARGV: now (ms).
-- Returns {priority, count, oldest created_at} per class present.
local stats = {}
local order = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do
  local a = string.find(m, '|', 1, true)
  local b = a and string.find(m, '|', a + 1, true)
  if b then
    local p = string.sub(m, 1, a - 1)
    local created = tonumber(string.sub(m, a + 1, b - 1)) or 0
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
