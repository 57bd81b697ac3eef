-- Record a job's terminal state once and free its room: 1 when this call recorded it.
-- KEYS: record, room order, lease, room holder, avatar note   ARGV: record json, job id, ttl s
redis.call('LREM', KEYS[2], 0, ARGV[2])
if redis.call('GET', KEYS[4]) == ARGV[2] then redis.call('DEL', KEYS[4]) end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  redis.call('DEL', KEYS[3], KEYS[5])
  return 1
end
return 0
