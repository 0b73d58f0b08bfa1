-- fence_validate_advance: the validate-and-advance compare-and-swap on a partition's fencing
-- watermark (DESIGN.md §4).
--   KEYS[1]  wal:writer:last_accepted:{<env>:<p>}   the watermark (canonical decimal integer)
--   ARGV[1]  token                                  the writer's fencing token
-- Returns (bulk string):
--   "OK"       token > stored, or no stored value: stored := token
--   "STALE"    token <= stored (strictly greater is required: each token passes once)
--   "CORRUPT"  stored or token is not a canonical decimal integer in [0, 2^53-1]; nothing changes
-- Lua numbers are doubles: every value is range-checked as a string before it becomes a number.
local MAX_SAFE = 9007199254740991

local function canonical(s)
  if type(s) ~= 'string' or #s == 0 or #s > 16 then return nil end
  if not string.find(s, '^%d+$') then return nil end
  if #s > 1 and string.sub(s, 1, 1) == '0' then return nil end
  local n = tonumber(s)
  if n == nil or n > MAX_SAFE then return nil end
  return n
end

local token = canonical(ARGV[1])
if token == nil then return 'CORRUPT' end

local raw = redis.call('GET', KEYS[1])
if raw then
  local stored = canonical(raw)
  if stored == nil then return 'CORRUPT' end
  if token <= stored then return 'STALE' end
end
redis.call('SET', KEYS[1], ARGV[1])
return 'OK'
