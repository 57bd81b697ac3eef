-- A worker process's parked jobs, each heartbeat: {task id, 1 if still its to keep} per job.
-- A job that ended or plays (a live lease) is no longer this process's to keep. Any other is
-- put back in its room's lane and order if they lost it (Redis lost its data, or the job was
-- handed on and given back), so a parked job outlives a Redis crash as a waiting one did.
-- A job put back in its room's order is marked rejoined, so no claim starts it before the
-- room's playing job re-asserted its own place (claim.lua's rejoin grace).
-- KEYS: lanes set   ARGV: record, lease, lane, room order, enqueued key prefixes, now, then
--       per job: task id, job id, room, lane entry
local out = {}
for i = 7, #ARGV, 4 do
  local task_id, job, room, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local lease = redis.call('GET', ARGV[2] .. job)
  local keep = 1
  if redis.call('EXISTS', ARGV[1] .. job) == 1 or (lease and string.sub(lease, 1, 1) ~= '~') then
    keep = 0
  else
    redis.call('HSETNX', ARGV[3] .. room, job, entry)
    redis.call('SADD', KEYS[1], room)
    if not redis.call('LPOS', ARGV[4] .. room, job) then
      redis.call('RPUSH', ARGV[4] .. room, job)
      redis.call('HSET', ARGV[5] .. job, 'rejoined', ARGV[6])
    end
  end
  table.insert(out, task_id)
  table.insert(out, keep)
end
return out
