"""The ledger: every Redis key avatarq uses and every Lua script it runs, in one place.

- `keys`: each key's name and how long it lives (only this package spells them);
- `scripts`: the `lua/*.lua` files, registered once per Redis client;
- `worker`: the workers' side (async): claim, watch, release, finish, dead-letter, and the
  worker processes' heartbeats and held deliveries;
- `producer`: the producers' side (sync, light): register at enqueue, cancel, status reads,
  avatar capacity, the dead-letter list.

Nothing is imported here, so `avatarq.settings` may read `keys` without pulling in Redis.
"""
