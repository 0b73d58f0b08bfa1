-- lease_release: drop a writer lease, only if the caller still holds it (DESIGN.md §4).
--   KEYS[1]  wal:writer:lock:{<env>:<p>}
--   ARGV[1]  holder
-- Returns 1 (released) or 0 (not the holder: nothing changed).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
