-- lease_acquire: take a partition's writer lease and mint its fencing token (DESIGN.md §4).
--   KEYS[1]  wal:writer:lock:{<env>:<p>}           holder id, PX ttl
--   KEYS[2]  wal:writer:fence:{<env>:<p>}          token counter
--   KEYS[3]  wal:writer:last_accepted:{<env>:<p>}  validate-and-advance watermark
--   ARGV[1]  holder   unique id of this acquisition
--   ARGV[2]  ttl_ms   lease lifetime in milliseconds (positive integer)
--   ARGV[3]  floor    highest token in the partition's WAL (canonical integer, 0 if none)
-- Returns:
--   {1, token}             acquired; token = max(counter + 1, watermark + 1, floor + 1), and the
--                          counter is set to it, so a lost or rolled-back counter (or watermark)
--                          can never leave the real writer STALE forever
--   {0, current_holder}    someone holds the lease
--   {-1, "TOKEN_OVERFLOW"} the token would exceed 2^53-1: refused, the lease is released
-- A counter or watermark that is not a canonical integer does not block acquisition (it is
-- treated as 0 here); validate-and-advance reports the CORRUPT watermark and fails closed.
local MAX_SAFE = 9007199254740991

local function canonical(s)
  if type(s) ~= 'string' or #s == 0 or #s > 16 then return nil end
  if not string.find(s, '^%d+$') then return nil end
  if #s > 1 and string.sub(s, 1, 1) == '0' then return nil end
  local n = tonumber(s)
  if n == nil or n > MAX_SAFE then return nil end
  return n
end

local holder = ARGV[1]
local ttl = canonical(ARGV[2])
local floor = canonical(ARGV[3])
if holder == nil or #holder == 0 then return redis.error_reply('ERR lease_acquire: empty holder') end
if ttl == nil or ttl < 1 then return redis.error_reply('ERR lease_acquire: bad ttl_ms') end
if floor == nil then return redis.error_reply('ERR lease_acquire: bad floor') end

if not redis.call('SET', KEYS[1], holder, 'NX', 'PX', ARGV[2]) then
  return {0, redis.call('GET', KEYS[1])}
end

local token = (canonical(redis.call('GET', KEYS[2])) or 0) + 1
local watermark = canonical(redis.call('GET', KEYS[3]))
if watermark ~= nil and watermark + 1 > token then token = watermark + 1 end
if floor + 1 > token then token = floor + 1 end
if token > MAX_SAFE then
  redis.call('DEL', KEYS[1])
  return {-1, 'TOKEN_OVERFLOW'}
end
redis.call('SET', KEYS[2], string.format('%.0f', token))
return {1, token}
