-- Extend a holder's lease; 0 when it had already expired (its slot may be someone else's).
-- KEYS[1] holders   ARGV: holder, now ms, lease ms
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false then return 0 end
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) <= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return 1
