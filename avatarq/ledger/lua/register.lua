-- Register a job at enqueue, once per job id: 1 when new (then send it), 0 when known.
-- The job takes its place at the end of its room's order here.
-- Until a worker claims it, it is listed as unseen (a message the broker lost is sent again).
-- KEYS: enqueued, room order, unseen   ARGV: now, room, payload json, ttl s, job id
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'ts', ARGV[1], 'room', ARGV[2], 'job', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('RPUSH', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[5])
return 1
