-- Give a job back without ending it, if the lease is still this token's: 1 when released.
-- The lease becomes a tombstone ('~' .. token) until it would have expired: a claim takes it
-- as free, but a late watch tick of this attempt can no longer renew it back to life.
-- KEYS: lease, room holder, attempts   ARGV: token, job id, 1 to take the attempt back
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], '~' .. ARGV[1], 'KEEPTTL')
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
if ARGV[3] == '1' then redis.call('DECR', KEYS[3]) end
return 1
