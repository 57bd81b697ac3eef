"""The ledger: every Redis key avatarq uses and every Lua script it runs, in one place.

`keys` names each key and how long it lives, `scripts` registers the `lua/*.lua` files,
`worker` is the workers' side (async), `types` the words it answers in, `sweeps` what a
worker's recovery sweep takes, and `producer` the producers' side (sync, light). Nothing is
imported here, so `avatarq.settings` may read `keys` without pulling in Redis."""
