"""`avatarq dev`: the embedded local stack's services, each on its own."""

from __future__ import annotations

import typer

from avatarq_dev.avatar_emulator import main as emulator_main
from avatarq_dev.livekit_server import main as server_main

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="The embedded local stack's services."
)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=PASS_THROUGH)
def livekit(ctx: typer.Context) -> None:
    """Run the local LiveKit-protocol server (development and tests only).

    Example: avatarq dev livekit --port 7880
    """
    raise typer.Exit(server_main(ctx.args))


@app.command(name="avatar", context_settings=PASS_THROUGH)
def avatar_emulator(ctx: typer.Context) -> None:
    """Run the avatar emulator (a GPU-free stand-in for the Avaluma avatar server).

    Example: avatarq dev avatar --port 8089 --license-key dev
    """
    raise typer.Exit(emulator_main(ctx.args))
