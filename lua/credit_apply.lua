-- credit_apply: consume up to `required` of a wallet's credit, once per request (DESIGN.md §4).
--   KEYS[1]  x402:credit:{<env>:<wallet>}:balance
--   KEYS[2]  x402:credit:{<env>:<wallet>}:use:<request_id>   consumption marker
--   ARGV[1]  required    amount wanted, base units, canonical integer in [0, 2^53-1]
--   ARGV[2]  ttl_s       lifetime of the marker, seconds (>= 1)
--   ARGV[3]  request_id  recorded in the marker
-- Returns {status, credit_used, remaining_credit} (amounts as strings):
--   {"APPLIED", used, remaining}    used = min(balance, required), DECRBY used, marker stored
--   {"DUPLICATE", used, remaining}  the marker exists: the first answer, nothing changes
--   {"CORRUPT", "0", raw}           the stored balance is not a canonical integer: nothing changes
-- The balance never goes negative; its TTL is kept as it is.
local MAX_SAFE = 9007199254740991

local function canonical(s)
  if type(s) ~= 'string' or #s == 0 or #s > 16 then return nil end
  if not string.find(s, '^%d+$') then return nil end
  if #s > 1 and string.sub(s, 1, 1) == '0' then return nil end
  local n = tonumber(s)
  if n == nil or n > MAX_SAFE then return nil end
  return n
end

local required = canonical(ARGV[1])
local ttl = canonical(ARGV[2])
if required == nil then return redis.error_reply('ERR credit_apply: bad required') end
if ttl == nil or ttl < 1 then return redis.error_reply('ERR credit_apply: bad ttl_s') end

local marker = redis.call('GET', KEYS[2])
if marker then
  local used, remaining = string.match(marker, '^(%d+):(%d+):')
  if used == nil then return {'CORRUPT', '0', marker} end
  return {'DUPLICATE', used, remaining}
end

local raw = redis.call('GET', KEYS[1])
local balance = 0
if raw then
  balance = canonical(raw)
  if balance == nil then return {'CORRUPT', '0', raw} end
end
local used = required
if balance < used then used = balance end
if used > 0 then redis.call('DECRBY', KEYS[1], string.format('%.0f', used)) end
local used_s = string.format('%.0f', used)
local remaining_s = string.format('%.0f', balance - used)
redis.call('SET', KEYS[2], used_s .. ':' .. remaining_s .. ':' .. ARGV[3], 'EX', ARGV[2])
return {'APPLIED', used_s, remaining_s}
