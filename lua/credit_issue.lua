-- credit_issue: the capped, idempotent credit-note increment (DESIGN.md §4).
--   KEYS[1]  x402:credit:{<env>:<wallet>}:balance    decimal integer string, base units
--   KEYS[2]  x402:credit:{<env>:<wallet>}:<note_id>  the note; its existence marks it applied
--   ARGV[1]  delta      amount to credit, base units, canonical integer in [1, 2^53-1]
--   ARGV[2]  cap        maximum balance, base units, canonical integer in [0, 2^53-1]
--   ARGV[3]  ttl_s      lifetime of balance and note, seconds (>= 1)
--   ARGV[4]  note_json  the note record to store
-- Returns {status, amount-as-string}:
--   {"DUPLICATE", balance}     the note exists: nothing changes (a retry never credits twice)
--   {"CORRUPT", raw}           the stored balance is not a canonical integer: nothing changes
--   {"CAP_EXCEEDED", balance}  balance + delta > cap: nothing changes (reaching the cap is allowed)
--   {"APPLIED", new_balance}   INCRBY, EXPIRE both keys, note stored
local MAX_SAFE = 9007199254740991

local function canonical(s)
  if type(s) ~= 'string' or #s == 0 or #s > 16 then return nil end
  if not string.find(s, '^%d+$') then return nil end
  if #s > 1 and string.sub(s, 1, 1) == '0' then return nil end
  local n = tonumber(s)
  if n == nil or n > MAX_SAFE then return nil end
  return n
end

local delta = canonical(ARGV[1])
local cap = canonical(ARGV[2])
local ttl = canonical(ARGV[3])
if delta == nil or delta < 1 then return redis.error_reply('ERR credit_issue: bad delta') end
if cap == nil then return redis.error_reply('ERR credit_issue: bad cap') end
if ttl == nil or ttl < 1 then return redis.error_reply('ERR credit_issue: bad ttl_s') end
if ARGV[4] == nil or #ARGV[4] == 0 then return redis.error_reply('ERR credit_issue: empty note') end

local raw = redis.call('GET', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then return {'DUPLICATE', raw or '0'} end
local balance = 0
if raw then
  balance = canonical(raw)
  if balance == nil then return {'CORRUPT', raw} end
end
-- cap - balance is exact (both <= 2^53-1); negative when a lowered cap is already exceeded.
if delta > cap - balance then return {'CAP_EXCEEDED', raw or '0'} end

local new_balance = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[3])
return {'APPLIED', string.format('%.0f', new_balance)}
