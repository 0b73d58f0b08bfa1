-- personality_upsert: create-or-update an onboarding personality atomically (DESIGN.md §9).
--   KEYS[1]  onboarding:personality:{<env>:<collection>}:<token_id>   a hash
--   ARGV[1]  default name ("Agent <token_id>")
--   ARGV[2..] field, value pairs to set (domains as a JSON array string)
-- An explicit null-check: when the hash does not exist it is created with the defaults
-- (voice "analytical", empty domains and instructions) before the fields are applied.
-- Returns {"created"|"updated", field1, value1, ...} (the stored hash after the change).
local status = 'updated'
if redis.call('EXISTS', KEYS[1]) == 0 then
  status = 'created'
  redis.call('HSET', KEYS[1], 'name', ARGV[1], 'voice', 'analytical', 'domains', '[]', 'instructions', '')
end
if #ARGV > 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
end
local result = {status}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields do result[#result + 1] = fields[i] end
return result
