-- Take one of a quota's session slots, first come first served.
-- KEYS[1] holders (zset: holder -> lease expiry ms)   KEYS[2] waiters (zset: job -> first wait ms)
-- KEYS[3] waiters seen (zset: job -> last poll ms)    KEYS[4] adaptive cap (string, with TTL)
-- KEYS[5] live workers' configured quotas (zset: quota -> expiry ms): the smallest holds
-- ARGV: holder, job id, lease ms, quota, waiter stale ms (times are Redis's: ledger/clock.py)
-- Returns {1, holders} when taken, else {0, place in line (0-based), holders, effective quota}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[5]))
for _, job in ipairs(stale) do
  redis.call('ZREM', KEYS[2], job)
  redis.call('ZREM', KEYS[3], job)
end
local quota = tonumber(ARGV[4])
local cap = tonumber(redis.call('GET', KEYS[4]) or quota)
if cap < quota then quota = cap end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
for _, limit in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if tonumber(limit) < quota then quota = tonumber(limit) end
end
if quota < 1 then quota = 1 end
local holders = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[2], 'NX', now, ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[2])
local place = redis.call('ZRANK', KEYS[2], ARGV[2])
if holders + place < quota then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  return {1, holders + 1}
end
return {0, place, holders, quota}
