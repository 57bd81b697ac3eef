"""The `avatarq` command: the roof of the house, above the producers, the worker and the dev
stack, which it uses and which never import it (the dev stack plugs its commands in through the
`avatarq.commands` entry-point group: avatarq_cli/plugins.py)."""
