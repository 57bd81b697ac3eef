-- Registered jobs no worker has claimed whose message went into the broker before `before`
-- (the broker no longer has it: lost on its way to a worker). Each is taken by exactly one
-- caller, which sends it again, and listed again from `now`: a flat list of {job id,
-- payload}. Jobs that ended or were claimed leave the list; those a live worker process
-- holds (received, not yet claimed, or handed on by their room's previous job) stay.
-- KEYS: unseen, workers set   ARGV: before, now, limit, then the record, enqueued, held and
--       heartbeat key prefixes
local workers = {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[7] .. w) == 1 then table.insert(workers, w) end
end
local out = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[3])
for _, job in ipairs(due) do
  local enqueued = ARGV[5] .. job
  local payload = redis.call('HGET', enqueued, 'job')
  if not payload or redis.call('HEXISTS', enqueued, 'seen') == 1
      or redis.call('EXISTS', ARGV[4] .. job) == 1 then
    redis.call('ZREM', KEYS[1], job)
  else
    local held = false
    for _, w in ipairs(workers) do
      if redis.call('HEXISTS', ARGV[6] .. w, job) == 1 then held = true break end
    end
    if not held then
      redis.call('ZADD', KEYS[1], ARGV[2], job)
      table.insert(out, job)
      table.insert(out, payload)
    end
  end
end
return out
