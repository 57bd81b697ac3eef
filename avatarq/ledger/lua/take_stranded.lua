-- Parked jobs nobody will hand on: the head of a lane's room that is still parked while no
-- job holds the room (its predecessor ended on a path that hands nothing on) and no agent
-- holds it (its agent plays it). Each is taken from its lane for exactly one caller, which
-- publishes it again: a flat list of entries.
-- KEYS: lanes set   ARGV: lane, room order, room holder, room agent key prefixes
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local lane = ARGV[1] .. room
  local head = redis.call('LINDEX', ARGV[2] .. room, 0)
  local entry = head and redis.call('HGET', lane, head)
  local free = redis.call('EXISTS', ARGV[3] .. room, ARGV[4] .. room) == 0
  if entry and free then
    redis.call('HDEL', lane, head)
    table.insert(out, entry)
  end
  if redis.call('HLEN', lane) == 0 then redis.call('SREM', KEYS[1], room) end
end
return out
