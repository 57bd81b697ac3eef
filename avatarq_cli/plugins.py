"""Sub-commands that other distributions plug in through the `avatarq.commands` entry-point
group, the way `celery` finds `celery.commands`: the dev stack brings `demo`, `dev`, `bench`
and `faults` (devstack/pyproject.toml) without the CLI importing it. Each is loaded only when
it runs, so `avatarq --help` and the producer commands never import the dev stack, and a dev
stack that is missing, or misses a dependency of its own, is one line saying what to install.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

import typer

from avatarq_cli.commands.common import DEV_STACK, dev_stack

GROUP = "avatarq.commands"
#: What the dev stack declares in GROUP: listed, and run to say how to install it, where the
#: dev stack is not installed (tests/test_cli_plugins.py holds it to devstack/pyproject.toml).
DEV_STACK_COMMANDS = ("demo", "dev", "bench", "faults")
#: Everything after the command's name, `--help` too, is the plugged-in command's own.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def plugged(name: str, entry_point: EntryPoint | None) -> Callable[[typer.Context], None]:
    """The command `name`: loads what `entry_point` names (a `typer.Typer`) and runs it with
    the arguments given; without an entry point, the dev stack is not installed."""

    def run(ctx: typer.Context) -> None:
        with dev_stack(ctx.command_path):
            if entry_point is None:
                raise ModuleNotFoundError("avatarq_dev is not installed", name="avatarq_dev")
            command = typer.main.get_command(entry_point.load())
            with command.make_context(name, ctx.args, parent=ctx.parent) as sub:
                command.invoke(sub)

    return run


def register(app: typer.Typer) -> None:
    """Add each command of GROUP to `app`, and each of the dev stack's that is not installed."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    for name in dict.fromkeys([*found, *DEV_STACK_COMMANDS]):
        entry_point = found.get(name)
        source = entry_point.dist.name if entry_point and entry_point.dist else DEV_STACK
        app.command(
            name=name,
            help=f"From {source}: see avatarq {name} --help.",
            context_settings=PASS_THROUGH,
            add_help_option=False,
        )(plugged(name, entry_point))
