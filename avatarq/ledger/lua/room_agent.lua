-- A conversational agent's hold on a room (avatarq_agents): 'hold' takes it, or renews it,
-- unless another live agent holds it; 'free' lets go of it if it is still this agent's.
-- Returns 1 when the room is (or was, for 'free') this agent's, else 0.
-- KEYS: room agent   ARGV: mode ('hold' or 'free'), agent id, lease ttl ms
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[2] then return 0 end
if ARGV[1] == 'free' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
