"""The dev stack's `avatarq` sub-commands, one `typer.Typer` a module, plugged into the CLI
through the `avatarq.commands` entry-point group (devstack/pyproject.toml): the CLI sits
above the dev stack and finds them there, and a lean install has neither them nor their
dependencies."""
