-- One watch tick of a playing job: {cancel requested, the job is still ours}. Renews the
-- lease and the room, and puts them back (with the job's place at the head of its room's
-- order) if Redis lost them; records how far the avatar has provably played (the checkpoint
-- a redelivery resumes from) and this attempt's span of the source.
-- position: what the avatar has provably played; sent: what it will have played once its
-- buffer plays out (where a dead worker's job resumes, since nothing cleared that buffer).
-- KEYS: lease, cancel, record, room order, room holder, checkpoint
-- ARGV: token, ttl ms, job id, position ('' for none), sent, attempt, attempt's start, ttl s
local cancel = redis.call('EXISTS', KEYS[2])
local holder = redis.call('GET', KEYS[1])
if (holder and holder ~= ARGV[1]) or redis.call('EXISTS', KEYS[3]) == 1 then
  return {cancel, 0}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local playing = redis.call('GET', KEYS[5])
if not playing or playing == ARGV[3] then
  redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[2])
end
if redis.call('LINDEX', KEYS[4], 0) ~= ARGV[3] then
  redis.call('LREM', KEYS[4], 0, ARGV[3])
  redis.call('LPUSH', KEYS[4], ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[6], 'position', ARGV[4], 'sent', ARGV[5], 'played_out', '0',
    ARGV[6], ARGV[7] .. ':' .. ARGV[5])
  redis.call('EXPIRE', KEYS[6], ARGV[8])
end
return {cancel, 1}
