-- Extend a holder's lease: 1, or 0 when it had lapsed (then it is counted again at once: its
-- session is still alive, so the slot is taken whether or not someone else took one meanwhile).
-- KEYS[1] holders   ARGV: holder, now ms, lease ms
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local live = score and tonumber(score) > tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
if live then return 1 end
return 0
