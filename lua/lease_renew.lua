-- lease_renew: extend a writer lease, only if the caller still holds it (DESIGN.md §4).
--   KEYS[1]  wal:writer:lock:{<env>:<p>}
--   ARGV[1]  holder; ARGV[2] ttl_ms
-- Returns 1 (renewed) or 0 (not the holder: the lease expired or was taken over).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
