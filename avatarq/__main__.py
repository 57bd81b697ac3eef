"""`python -m avatarq`: the `avatarq` command."""

from avatarq.cli import main

main()
