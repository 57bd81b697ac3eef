-- Try to start playing a job: {verdict, attempt}. Verdicts: done (already ended), cancelled
-- (before it started), busy (another delivery holds its lease), wait (not its room's turn),
-- ok (play it now, as attempt `attempt`).
-- KEYS: record, cancel, lease, room order, attempts, enqueued, room holder
-- ARGV: lease token, lease ttl ms, job id, now, record ttl s, rejoin grace s
if redis.call('EXISTS', KEYS[1]) == 1 then return {'done', 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancelled', 0} end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return {'busy', 0} end
redis.call('HSETNX', KEYS[6], 'ts', ARGV[4])
redis.call('HSET', KEYS[6], 'seen', ARGV[4])
redis.call('EXPIRE', KEYS[6], ARGV[5])
if not redis.call('LPOS', KEYS[4], ARGV[3]) then
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('HSET', KEYS[6], 'rejoined', ARGV[4])
  return {'wait', 0}
end
if redis.call('LINDEX', KEYS[4], 0) ~= ARGV[3] then return {'wait', 0} end
local rejoined = redis.call('HGET', KEYS[6], 'rejoined')
if rejoined and tonumber(ARGV[4]) - tonumber(rejoined) < tonumber(ARGV[6]) then
  return {'wait', 0}
end
local playing = redis.call('GET', KEYS[7])
if playing and playing ~= ARGV[3] then return {'wait', 0} end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[7], ARGV[3], 'PX', ARGV[2])
local n = redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[5])
return {'ok', n}
