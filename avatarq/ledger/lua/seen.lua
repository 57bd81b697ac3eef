-- Of the jobs a worker process sent back through the broker, those now answered for by
-- someone: {task id, 1 if seen} per job. Seen: it ended, plays under a live lease, or another
-- live worker process holds it (received, parked or handed on).
-- KEYS: workers set   ARGV: record, lease, held, heartbeat key prefixes, this worker's id,
--       then per job: task id, job id
local workers = {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if w ~= ARGV[5] and redis.call('EXISTS', ARGV[4] .. w) == 1 then table.insert(workers, w) end
end
local out = {}
for i = 6, #ARGV, 2 do
  local task_id, job = ARGV[i], ARGV[i + 1]
  local lease = redis.call('GET', ARGV[2] .. job)
  local seen = redis.call('EXISTS', ARGV[1] .. job) == 1 or (lease and string.sub(lease, 1, 1) ~= '~')
  if not seen then
    for _, w in ipairs(workers) do
      if redis.call('HEXISTS', ARGV[3] .. w, task_id) == 1 then seen = true break end
    end
  end
  table.insert(out, task_id)
  table.insert(out, seen and 1 or 0)
end
return out
