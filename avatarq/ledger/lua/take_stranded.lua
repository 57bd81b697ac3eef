-- Parked jobs nobody will hand on: the head of a lane's room that is still parked while no
-- job holds the room (its predecessor ended on a path that hands nothing on). Each is taken
-- from its lane for exactly one caller, which publishes it again: a flat list of entries.
-- KEYS: lanes set   ARGV: lane, room order, room holder key prefixes
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local lane = ARGV[1] .. room
  local head = redis.call('LINDEX', ARGV[2] .. room, 0)
  local entry = head and redis.call('HGET', lane, head)
  if entry and redis.call('EXISTS', ARGV[3] .. room) == 0 then
    redis.call('HDEL', lane, head)
    table.insert(out, entry)
  end
  if redis.call('HLEN', lane) == 0 then redis.call('SREM', KEYS[1], room) end
end
return out
