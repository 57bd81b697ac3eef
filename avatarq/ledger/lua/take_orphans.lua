-- Deliveries held by worker processes whose heartbeat is gone, and the webhooks they had
-- yet to deliver, taken (and so recovered) by exactly one caller: {deliveries, webhooks},
-- flat lists of {task id, payload, 1 if it was playing (held the lease)} and of {job id,
-- webhook URL, the job's record}. A dead worker's leases go with it; jobs that ended are
-- left out. A playing one's avatar played out what it had buffered: it resumes from what
-- was sent. The webhooks become the caller's to deliver (owed in its name from now on).
-- KEYS: workers set, the caller's webhooks   ARGV: heartbeat, held, lease,
--       record, checkpoint and webhooks key prefixes
local out, webhooks = {}, {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. w) == 0 then
    local pending = redis.call('HGETALL', ARGV[6] .. w)
    for i = 1, #pending, 2 do
      local record = redis.call('GET', ARGV[4] .. pending[i])
      if record then
        table.insert(webhooks, pending[i])
        table.insert(webhooks, pending[i + 1])
        table.insert(webhooks, record)
        redis.call('HSET', KEYS[2], pending[i], pending[i + 1])
      end
    end
    redis.call('DEL', ARGV[6] .. w)
    local items = redis.call('HGETALL', ARGV[2] .. w)
    for i = 1, #items, 2 do
      -- The job's own id, which its lease, record and checkpoint go by: a message sent
      -- without `enqueue` may carry it under another task id.
      local ok, body = pcall(cjson.decode, items[i + 1])
      local job = items[i]
      if ok and type(body) == 'table' and type(body.job_id) == 'string' then job = body.job_id end
      local lease = ARGV[3] .. job
      local holder = redis.call('GET', lease)
      local playing = 0
      if holder and string.sub(holder, 1, #w + 1) == w .. '/' then
        redis.call('DEL', lease)
        if redis.call('EXISTS', ARGV[5] .. job) == 1 then
          redis.call('HSET', ARGV[5] .. job, 'played_out', '1')
        end
        playing = 1
      end
      if redis.call('EXISTS', ARGV[4] .. job) == 0 then
        table.insert(out, items[i])
        table.insert(out, items[i + 1])
        table.insert(out, playing)
      end
    end
    redis.call('DEL', ARGV[2] .. w)
    redis.call('SREM', KEYS[1], w)
  end
end
return {out, webhooks}
