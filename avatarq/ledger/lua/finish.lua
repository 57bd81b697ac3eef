-- Record a job's terminal state once and free its room: {status, next task id, its payload}.
-- status 1: recorded by this call; 0: it had ended already; -1: another delivery holds its
-- lease (this attempt was taken over: it records nothing).
-- When recorded, the room's next job is handed to the caller's worker process (its held
-- deliveries, so recovery covers it) to be played next: from the lane if it is parked there,
-- else from its registration if no worker has seen it yet (its message is still in the
-- broker, maybe behind other rooms' jobs; that message, when it comes, finds the job playing
-- or ended and is dropped).
-- When recorded with a webhook URL, it is noted among the worker's webhooks to deliver (the
-- worker deletes it once delivered; recovery delivers a dead worker's).
-- KEYS: record, room order, lease, room holder, avatar note, lane, lanes, held ('' for none),
--       checkpoint, webhooks ('' for none)
-- ARGV: record json, job id, ttl s, token, room, enqueued key prefix, webhook URL ('' for none),
--       now
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[4] and string.sub(holder, 1, 1) ~= '~' then return {-1, '', ''} end
redis.call('LREM', KEYS[2], 0, ARGV[2])
redis.call('HDEL', KEYS[6], ARGV[2])
if redis.call('GET', KEYS[4]) == ARGV[2] then redis.call('DEL', KEYS[4]) end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then return {0, '', ''} end
redis.call('DEL', KEYS[3], KEYS[5], KEYS[9])
if KEYS[10] ~= '' and ARGV[7] ~= '' then redis.call('HSET', KEYS[10], ARGV[2], ARGV[7]) end
local nxt = redis.call('LINDEX', KEYS[2], 0)
if KEYS[8] == '' or not nxt then return {1, '', ''} end
-- A producer's job id is its message's task id (producers/client.py).
local task_id, payload = nxt, nil
local entry = redis.call('HGET', KEYS[6], nxt)
if entry then
  redis.call('HDEL', KEYS[6], nxt)
  if redis.call('HLEN', KEYS[6]) == 0 then redis.call('SREM', KEYS[7], ARGV[5]) end
  local parked = cjson.decode(entry)
  task_id, payload = parked['task_id'], parked['payload']
else
  local enqueued = ARGV[6] .. nxt
  payload = redis.call('HGET', enqueued, 'job')
  if not payload or redis.call('HEXISTS', enqueued, 'seen') == 1 then return {1, '', ''} end
end
redis.call('HSET', KEYS[8], task_id, payload)
-- In a worker's hands from now: however long it waited, it is not a lost head.
if redis.call('EXISTS', ARGV[6] .. nxt) == 1 then redis.call('HSET', ARGV[6] .. nxt, 'seen', ARGV[8]) end
return {1, task_id, payload}
