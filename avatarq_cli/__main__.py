"""`python -m avatarq_cli`: the `avatarq` command (how the dev stack re-runs one inside a
network namespace)."""

from avatarq_cli.app import main

main()
