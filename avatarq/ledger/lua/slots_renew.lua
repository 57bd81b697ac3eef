-- Extend a holder's lease: 1, or 0 when it had lapsed (then it is counted again at once: its
-- session is still alive, so the slot is taken whether or not someone else took one meanwhile).
-- KEYS[1] holders   ARGV: holder, lease ms (times are Redis's: ledger/clock.py)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local live = score and tonumber(score) > now
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if live then return 1 end
return 0
