"""The ledger: every Redis key avatarq uses and every Lua script it runs, in one place.

`keys` names each key and how long it lives, `scripts` registers the `lua/*.lua` files,
`worker` is the workers' side (async) and `producer` the producers' (sync, light). Nothing is
imported here, so `avatarq.settings` may read `keys` without pulling in Redis."""
