-- Job slot. KEYS[1] job. ARGV: ttl seconds, then the record's field/value pairs.
-- Writes the record of an admitted job, unless one exists: the reconciler fences an admission
-- that took too long by writing a terminal record first, and the late writer must then give up.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
