-- Try to start playing a job: {verdict, attempt}. Verdicts: done (already ended), cancelled
-- (before it started), busy (another delivery holds its lease), wait (not its room's turn:
-- try again later), parked (not its room's turn: kept in the room's lane, whose playing job
-- hands it on when it ends), ok (play it now, as attempt `attempt`).
-- A lease starting with '~' is a released one's tombstone: free, yet never renewed back.
-- A room held by a conversational agent (avatarq_agents) plays through that agent only: any
-- other process's claim parks (or waits), whatever its place.
-- Any claim takes the job off the unseen list: its message reached a worker.
-- KEYS: record, cancel, lease, room order, attempts, enqueued, room holder, lane, lanes,
--       room agent, unseen
-- ARGV: lease token, lease ttl ms, job id, now, record ttl s, rejoin grace s, lane entry
--       ('' to wait instead of parking), room
redis.call('ZREM', KEYS[11], ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then return {'done', 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancelled', 0} end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] and string.sub(holder, 1, 1) ~= '~' then
  return {'busy', 0}
end
redis.call('HSETNX', KEYS[6], 'ts', ARGV[4])
redis.call('HSET', KEYS[6], 'seen', ARGV[4])
redis.call('EXPIRE', KEYS[6], ARGV[5])
if not redis.call('LPOS', KEYS[4], ARGV[3]) then
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('HSET', KEYS[6], 'rejoined', ARGV[4])
  return {'wait', 0}
end
local function behind()
  if ARGV[7] == '' then return {'wait', 0} end
  redis.call('HSET', KEYS[8], ARGV[3], ARGV[7])
  redis.call('EXPIRE', KEYS[8], ARGV[5])
  redis.call('SADD', KEYS[9], ARGV[8])
  return {'parked', 0}
end
local agent = redis.call('GET', KEYS[10])
if agent and agent ~= string.match(ARGV[1], '^(.*)/') then return behind() end
if redis.call('LINDEX', KEYS[4], 0) ~= ARGV[3] then return behind() end
local rejoined = redis.call('HGET', KEYS[6], 'rejoined')
if rejoined and tonumber(ARGV[4]) - tonumber(rejoined) < tonumber(ARGV[6]) then
  return {'wait', 0}
end
local playing = redis.call('GET', KEYS[7])
if playing and playing ~= ARGV[3] then return behind() end
redis.call('HDEL', KEYS[8], ARGV[3])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[7], ARGV[3], 'PX', ARGV[2])
local n = redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[5])
return {'ok', n}
